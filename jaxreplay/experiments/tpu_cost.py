"""FLOPs and bytes per chip of a run's programs, with no loop hiding its trips, and what they imply on a chip.

XLA's cost analysis counts a while loop's body once. A run's programs loop over layers (nn.scan), microbatches
(lax.scan) and decode positions (the sampler). So the cost comes from variants of each program, compiled for the
same mesh, that differ in what one trip holds: the layer scan with 1 and 2 layers per trip (`scan_unroll`), and
one microbatch of 1 and 2 chunks' rows. f(u, k) − f(1, k) is then one layer's cost, f(u, 2) − f(u, 1) one
chunk's gradient, and
  cost(L, m) = f(1,1) + (L−1)·Δu + (m−1)·Δk + (L−1)(m−1)·Δuk
with Δu = f(2,1) − f(1,1), Δk = f(1,2) − f(1,1), Δuk = f(2,2) − f(2,1) − f(1,2) + f(1,1): exact when every layer
costs the same and the optimizer's update runs once per step. The layers stay in a loop of ≥ 2 trips (an odd L
is measured at L + 1 layers, and L = 2 at 4: the per-layer cost is the same): fully unrolled, XLA would merge remat's
recomputed forward pass with the original one, and count a program the run does not execute. The sampler costs
its prefill plus T − 2 decode steps (positions 2 … T−1; the prefill picks position 1).
"""

from __future__ import annotations

from jaxreplay import config as config_lib
from jaxreplay.experiments import chips as chips_lib

COST_KEYS = ("flops", "bytes accessed")


def costs(compiled) -> dict:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {k: float(ca.get(k, 0.0)) for k in COST_KEYS}


def even_layers(L: int) -> int:
  """The layers of the variants: a loop of at least 2 trips of 2 layers (1 stays 1: nothing to extrapolate)."""
  return 1 if L == 1 else max(4, L + L % 2)


def variant(c, unroll: int, chunks: int):
  """The config with `unroll` layers per scan trip (the layers made even) and one microbatch of `chunks` × the
  step's microbatch rows."""
  v = c.copy_and_resolve_references()
  m, L = c.train.microbatches, c.model.n_layers
  v.model.n_layers = even_layers(L)
  v.model.scan_unroll = unroll
  v.train.microbatches = 1
  v.optim.batch_size = c.optim.batch_size // m * chunks
  if c.replay.batch_size:
    v.replay.batch_size = c.replay.batch_size // m * chunks
  # the teacher the real run resolves to, however many rows the variant has
  v.replay.teacher = config_lib.replay_teacher(c, 1) if c.replay.method == "kl" and c.replay.source == "self" \
      else c.replay.get("teacher", "auto")
  return v


def extrapolate(f: dict, L: int, m: int) -> dict:
  """cost(L, m) from f[(u, k)] for u, k in {1, 2} (u = 2 only when L > 1, k = 2 only when m > 1)."""
  out = {}
  for key in COST_KEYS:
    f11 = f[1, 1][key]
    f21 = f[2, 1][key] if L > 1 else f11
    value = f11 + (L - 1) * (f21 - f11)
    if m > 1:
      f12 = f[1, 2][key]
      f22 = f[2, 2][key] if L > 1 else f12
      value += (m - 1) * (f12 - f11) + (L - 1) * (m - 1) * (f22 - f21 - f12 + f11)
    out[key] = value
  return out


def program_costs(c, mesh, programs_fn, compile_fn, names, real: dict | None = None) -> dict[str, dict]:
  """{program: {flops, bytes accessed}} per chip for the programs `names` of the run `c`, from its variants.

  `programs_fn(config, mesh)` builds a config's programs, `compile_fn(program)` compiles one. `real`: the costs of
  the run's own compiled programs, which stand for the variant (1, 1) where they are the same program."""
  L, m = c.model.n_layers, c.train.microbatches
  unrolls = (1, 2) if L > 1 else (1,)
  # The train step at 1 and 2 chunks of a microbatch's rows; the other programs at the whole batch (k = m).
  wanted = {(u, k): ["train_step"] for u in unrolls for k in ((1, 2) if m > 1 else (1,))}
  for u in unrolls:
    wanted.setdefault((u, m), []).extend(n for n in names if n != "train_step")
  same = even_layers(L) == L and c.model.scan_unroll in (0, 1)  # variant (1, ·) is the real layer loop
  measured = {}
  for (u, k), which in sorted(wanted.items()):
    point = lambda name: (u, 1 if name != "train_step" else k)
    if u == 1 and same and real:
      for name in which:
        if name in real and (name != "train_step" or m == 1):
          measured.setdefault(name, {})[point(name)] = real[name]
      which = [n for n in which if point(n) not in measured.get(n, {})]
    if not which:
      continue
    progs = programs_fn(variant(c, u, k), mesh)
    for name in which:
      if name in progs:
        compiled, _ = compile_fn(progs[name])
        measured.setdefault(name, {})[point(name)] = costs(compiled)
  out = {}
  for name, f in measured.items():
    out[name] = extrapolate(f, L, m if name == "train_step" else 1)
    # The real program's own count (each loop body once) bounds it from below; bytes accessed are not quite
    # linear in the layers (XLA fuses the variants differently), and can extrapolate below it.
    for key in COST_KEYS if real and name in real else ():
      out[name][key] = max(out[name][key], real[name][key])
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
