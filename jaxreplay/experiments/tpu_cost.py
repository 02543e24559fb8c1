"""FLOPs and bytes per chip of a run's programs, with no loop hiding its trips, and what they imply on a chip.

XLA's cost analysis counts a while loop's body once. A run's programs loop over layers (nn.scan), microbatches
(lax.scan) and decode positions (the sampler). So the cost is read from loop-free variants of each program,
compiled for the same mesh: the model with 1 and 2 layers, unrolled, and one microbatch of 1 and 2 chunks' rows.
Cost is linear in the layers l and (for the train step) bilinear in l and the chunks k, so
  cost(L, m) = f(1,1) + (L−1)·Δl + (m−1)·Δk + (L−1)(m−1)·Δlk
with Δl = f(2,1) − f(1,1), Δk = f(1,2) − f(1,1), Δlk = f(2,2) − f(2,1) − f(1,2) + f(1,1): exact when every layer
costs the same and the optimizer's update runs once per step. The sampler costs its prefill plus T − 2 decode
steps (positions 2 … T−1; the prefill picks position 1). Compiling the 2-layer variants takes seconds where
unrolling all L layers of the real program takes minutes.
"""

from __future__ import annotations

from jaxreplay import config as config_lib
from jaxreplay.experiments import chips as chips_lib

COST_KEYS = ("flops", "bytes accessed")


def costs(compiled) -> dict:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {k: float(ca.get(k, 0.0)) for k in COST_KEYS}


def variant(c, layers: int, chunks: int):
  """The config with `layers` unrolled layers and one microbatch of `chunks` × the step's microbatch rows."""
  v = c.copy_and_resolve_references()
  m = c.train.microbatches
  v.model.n_layers, v.model.scan_unroll = layers, layers
  v.train.microbatches = 1
  v.optim.batch_size = c.optim.batch_size // m * chunks
  if c.replay.batch_size:
    v.replay.batch_size = c.replay.batch_size // m * chunks
  # the teacher the real run resolves to, however many rows the variant has
  v.replay.teacher = config_lib.replay_teacher(c, 1) if c.replay.method == "kl" and c.replay.source == "self" \
      else c.replay.get("teacher", "auto")
  return v


def extrapolate(f: dict, L: int, m: int) -> dict:
  """cost(L, m) from f[(l, k)] for l, k in {1, 2} (k = 2 only when m > 1)."""
  out = {}
  for key in COST_KEYS:
    f11, f21 = f[1, 1][key], f[2, 1][key]
    value = f11 + (L - 1) * (f21 - f11)
    if m > 1:
      f12, f22 = f[1, 2][key], f[2, 2][key]
      value += (m - 1) * (f12 - f11) + (L - 1) * (m - 1) * (f22 - f21 - f12 + f11)
    out[key] = value
  return out


def program_costs(c, mesh, programs_fn, compile_fn, names) -> dict[str, dict]:
  """{program: {flops, bytes accessed}} per chip for the programs `names` of the run `c`, from loop-free variants.

  `programs_fn(config, mesh)` builds a config's programs, `compile_fn(program)` compiles one (None if it runs out
  of memory: a variant holds no more than the real program, so that does not happen for one that fits)."""
  L, m = c.model.n_layers, c.train.microbatches
  # The train step at 1 and 2 chunks of a microbatch's rows; the other programs at the whole batch (k = m).
  wanted = {(l, k): ["train_step"] for l in (1, 2) for k in ((1, 2) if m > 1 else (1,))}
  for l in (1, 2):
    wanted.setdefault((l, m), []).extend(n for n in names if n != "train_step")
  measured = {}
  for (l, k), which in sorted(wanted.items()):
    progs = programs_fn(variant(c, l, k), mesh)
    for name in which:
      if name in progs:
        compiled, _ = compile_fn(progs[name])
        measured.setdefault(name, {})[l, 1 if name != "train_step" else k] = costs(compiled)
  out = {}
  for name, f in measured.items():
    out[name] = extrapolate(f, L, m if name == "train_step" else 1)
  if "prefill" in out and "decode_step" in out:
    steps = c.model.seq_len - 2
    out["sampler"] = {k: out["prefill"][k] + steps * out["decode_step"][k] for k in COST_KEYS}
  return out


def summary(chip: chips_lib.Chip, cost: dict, tokens: int, model_flops: float, chips: int) -> dict:
  """The roofline time of one call on one chip, and the tokens/s and MFU it implies for the whole slice."""
  seconds = chips_lib.roofline_seconds(chip, cost["flops"], cost["bytes accessed"])
  bound = "compute" if cost["flops"] / chip.peak_bf16_flops >= cost["bytes accessed"] / chip.hbm_bandwidth \
      else "memory"
  out = dict(flops=cost["flops"], bytes_accessed=cost["bytes accessed"], roofline_s=seconds, bound=bound)
  if seconds > 0 and tokens:
    out["tokens_per_s"] = tokens / seconds
    out["mfu"] = model_flops / (seconds * chip.peak_bf16_flops * chips)
    out["flops_ratio"] = cost["flops"] * chips / model_flops if model_flops else None
  return out
