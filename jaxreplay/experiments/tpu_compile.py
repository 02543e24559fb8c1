"""Every program of a run compiled for a real TPU topology on any machine, with its HBM per chip and its cost.

With libtpu installed (`jax[tpu]`), `jax.experimental.topologies.get_topology_desc` gives the abstract devices of
a slice; the run's own mesh over them and `jit(...).lower(ShapeDtypeStructs).compile()` run the real TPU
compiler. `memory_analysis()` gives bytes per chip; `cost_analysis()` FLOPs and bytes accessed per chip.

The compiler's cost analysis counts a loop's body once: the layers' scan, the microbatches' scan and the
sampler's decode loop. So the cost comes from variants beside the real program (`tpu_cost.py`): 1 and 2 layers
per trip of the layer loop, 1 and 2 chunks of rows, extrapolated to L layers and m microbatches, and the sampler
as its prefill plus (T − 2) decode steps. Unrolling every layer instead compiles ~10× slower, and lets XLA merge
remat's recomputation away, so it would count a program the run does not execute.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
import types

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreplay import config as config_lib, sharding
from jaxreplay.errors import ConfigError, MeshError, UserError
from jaxreplay.experiments import tpu_cost
from jaxreplay.experiments.chips import CHIPS, Chip
from jaxreplay.models import decoder, export as export_lib, hf_import, sampler as sampler_lib
from jaxreplay.replay import sources as replay_lib
from jaxreplay.train import loop, optim, steps

EXAMPLES = "v5e:2x2, v5e:2x4, v5e:4x4, v4:2x2x1, v4:2x2x4, v5p:2x2x1, v6e:2x2, v6e:2x4"


class DoesNotFit(UserError):
  """A program needs more HBM per chip than the chip has."""


@dataclasses.dataclass
class Target:
  name: str
  chip: Chip
  devices: list  # one abstract device per chip
  hosts: int

  @property
  def chips(self) -> int:
    return len(self.devices)


def check_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"--target compiles with the TPU compiler, which is not installed: pip install "
                    f"'jax[tpu]=={jax.__version__}' (libtpu; keep JAX_PLATFORMS=cpu on a machine without TPUs).")


def target(name: str) -> Target:
  """The abstract devices of a topology such as v5e:2x2; one clear sentence for an unknown or malformed name."""
  gen, _, shape = name.partition(":")
  if gen not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise UserError(f"--target={name!r} is not a TPU topology: use GENERATION:SHAPE with a generation of "
                    f"{', '.join(CHIPS)}, e.g. {EXAMPLES}.")
  check_libtpu()
  # Compiling opens no TPU, so processes (xdist workers, a CLI beside tests) need not take libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  chip = CHIPS[gen]
  # Megacore chips (v4, v5p): one device per chip, as a real host's jax.devices() lists them.
  config_name = "megacore" if chip.cores_per_chip > 1 else "default"
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name=config_name)
  except Exception as e:
    first = str(e).splitlines()[0]
    if "INVALID_ARGUMENT" not in first:  # libtpu itself failed
      raise UserError(f"The TPU compiler (libtpu) could not start ({first}): reinstall "
                      f"'jax[tpu]=={jax.__version__}' and keep JAX_PLATFORMS=cpu.") from None
    raise UserError(f"--target={name!r} is not a {gen} topology the TPU compiler knows ({first}): use a slice shape "
                    f"such as {EXAMPLES}.") from None
  devices = list(desc.devices)
  return Target(name, chip, devices, len({d.process_index for d in devices}))


def model_config(c, platform: str = "tpu") -> decoder.ModelConfig:
  """The model the run trains on `platform`, with its shape from the config (or a local Hugging Face config)."""
  if c.model.path:
    path = c.model.path
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise ConfigError(f"--target needs the model's shape, but config.model.path={path!r} is not a local "
                        "checkpoint directory with a config.json: download it first (jaxreplay instruct does).")
    hf = hf_import.read_config(path)
    unroll = c.model.scan_unroll or 1
    return hf_import.config_from_hf(hf, c.model.seq_len, config_lib.compute_dtype_name(c, platform),
                                    c.model.remat, unroll)
  return decoder.ModelConfig.from_config(c.model, config_lib.compute_dtype_name(c, platform), platform)


def resolve_shape(c):
  """A finetuning run's shape is its parent's: read from init.from's export when it is here; otherwise (a sweep
  not yet run) the config's own model keys, which a sweep sets to the parent's."""
  parent = c.init["from"]
  if parent and os.path.isdir(parent):
    try:
      cfg = export_lib.exported_config(parent)
    except Exception:  # no export yet: the config's own keys
      return
    config_lib.inherit_model_shape(c, cfg)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _rows(mesh, n: int, *shape, dtype="int32"):
  s = sharding.batch_sharding(mesh, 1 + len(shape))
  return jax.ShapeDtypeStruct((n, *shape), dtype, sharding=s)


@dataclasses.dataclass
class Program:
  """One jitted program with abstract arguments; `tokens`: tokens one call processes; `model_flops`: the
  model's FLOPs per call (6N per trained token, 2N per forward-only token, attention included)."""
  name: str
  jitted: object
  args: tuple
  tokens: int
  model_flops: float


def finetunes(c) -> bool:
  return bool(c.init["from"] or c.model.path)


def programs(c, mesh) -> dict[str, Program]:
  """The programs one run executes, built as the training loop builds them (train/loop.py compile_steps)."""
  model_cfg = model_config(c)
  B, T, V = c.optim.batch_size, model_cfg.seq_len, model_cfg.vocab_size
  key = jax.random.key(0)
  abstract_params = jax.eval_shape(lambda: decoder.init_params(model_cfg, key))
  param_sh = sharding.param_shardings(abstract_params, mesh)
  frozen = _abstract(abstract_params, param_sh) if finetunes(c) else None
  trainable_fn, merge_fn = replay_lib.parameterization(c)
  opt = optim.make_optimizer(c, 1000)
  init_fn = lambda k, fr: steps.init_state(model_cfg, opt, k, trainable_fn, fr)
  abstract_state = jax.eval_shape(init_fn, key, frozen)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  method = c.replay.method if frozen is not None else "none"
  needs_rows = method in ("kl", "ntp", "replace")
  div = sharding.batch_divisor(mesh)
  teacher = needs_rows and config_lib.replay_teacher(c, div) == "sampled"
  replay = dataclasses.make_dataclass("Replay", [("sampled_teacher", bool)])(teacher) if needs_rows else None
  stage = types.SimpleNamespace(c=c, model_cfg=model_cfg, mesh=mesh, total_steps=1000)
  # the loop's own train and eval steps
  train_step, eval_fn, _ = loop.compile_steps(stage, opt, state_sh, param_sh, frozen, merge_fn, replay)

  R = c.replay.batch_size or B
  per_token = decoder.flops_per_token(model_cfg)
  state = _abstract(abstract_state, state_sh)
  batch = _rows(mesh, B, T)
  if c.model.path:
    batch = dict(tokens=batch, mask=_rows(mesh, B, T, dtype="bool"), segments=_rows(mesh, B, T))
  replay_rows = _rows(mesh, R, T) if needs_rows else None
  teacher_rows = _rows(mesh, R, T, V, dtype="float32") if teacher else None
  trained = B + (R if method in ("kl", "ntp") else 0)
  forward_only = (R if method == "kl" and not teacher else 0) + (B if method == "kl_downstream" else 0)
  out = {"init": Program("init", jax.jit(init_fn, out_shardings=state_sh), (key, frozen), 0, 0.0)}
  out["train_step"] = Program("train_step", train_step, (state, frozen, batch, replay_rows, teacher_rows), B * T,
                              per_token * (trained + forward_only / 3) * T)
  EB = -(-c.eval.batch_size // div) * div
  params = _abstract(abstract_params, param_sh)
  kl = frozen is not None
  out["eval_step"] = Program("eval_step", eval_fn, (params, frozen, _rows(mesh, EB, T)), EB * T,
                             per_token / 3 * EB * T * (2 if kl else 1))
  if method in ("kl", "ntp", "replace") and c.replay.source == "self":
    out.update(sampler_programs(c, model_cfg, mesh, frozen, R * c.replay.buffer, teacher))
  return out


def sampler_programs(c, model_cfg, mesh, frozen, n: int, return_logits: bool) -> dict[str, Program]:
  """The replay sampler (one program: prefill, then a decode loop), and its prefill and one decode step alone,
  whose costs make the sampler's: prefill + (T − 2) decode steps."""
  T = model_cfg.seq_len
  sc = sampler_lib.SamplingConfig(temperature=float(c.replay.temperature), top_k=int(c.replay.top_k),
                                  top_p=float(c.replay.top_p))
  s = sampler_lib.make_sampler(model_cfg, sc, n, 1, T, mesh, return_logits=return_logits)
  u = jax.ShapeDtypeStruct((T, n), "float32", sharding=s.u_sharding)
  fwd = decoder.flops_per_token(model_cfg) / 3
  out = {"sampler": Program("sampler", s.program, (frozen, _rows(mesh, n, 1), u), n * T, fwd * n * T)}
  cache_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  cache = jax.eval_shape(lambda: decoder.init_cache(model_cfg, n, T))
  cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cache_sh), cache)
  prefill = jax.jit(lambda p, x: decoder.apply(model_cfg, p, x, cache=decoder.init_cache(model_cfg, n, 1)))
  step = jax.jit(lambda p, x, cache, pos: decoder.apply(model_cfg, p, x, cache=cache, cache_index=pos),
                 donate_argnums=(2,))
  out["prefill"] = Program("prefill", prefill, (frozen, _rows(mesh, n, 1)), n, fwd * n)
  out["decode_step"] = Program("decode_step", step, (frozen, _rows(mesh, n, 1), cache,
                                                     jax.ShapeDtypeStruct((), "int32")), n, fwd * n)
  return out


def check_batch(c, mesh):
  div = sharding.batch_divisor(mesh) * c.train.microbatches
  if c.optim.batch_size % div:
    raise ConfigError(f"config.optim.batch_size={c.optim.batch_size} is not divisible by the {div} data-parallel "
                      "chips × train.microbatches of this target: choose a multiple of mesh.data × mesh.fsdp.")


def make_mesh(c, tgt: Target):
  """The run's mesh over the target's chips: MeshError (one sentence) when its product does not divide them."""
  sizes = [c.mesh[a] for a in sharding.AXES if c.mesh[a] != -1]
  if tgt.chips % math.prod(sizes):
    raise MeshError(f"config.mesh data×fsdp×tensor fixes {math.prod(sizes)} chips, which does not divide the "
                    f"{tgt.chips} chips of {tgt.name}: choose sizes whose product divides {tgt.chips}.")
  return sharding.make_mesh(c.mesh, tgt.devices)


def compile_program(prog: Program):
  """(compiled, seconds), or None and the compiler's message when it runs out of HBM."""
  start = time.perf_counter()
  try:
    compiled = prog.jitted.lower(*prog.args).compile()
  except Exception as e:  # XlaRuntimeError; only running out of memory is the user's to fix
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e)
  return compiled, time.perf_counter() - start


def hbm_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliases=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
  parts["total"] = parts["arguments"] + parts["outputs"] - parts["aliases"] + parts["temporaries"] + parts["code"]
  return parts


def needed_from_message(message: str) -> float | None:
  """The bytes the compiler says a program needs, from its RESOURCE_EXHAUSTED message (e.g. '(29.45G)')."""
  sizes = re.findall(r"\(([\d.]+)([KMGT])\)", message)
  if not sizes:
    return None
  scale = dict(K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)
  return float(sizes[0][0]) * scale[sizes[0][1]]


def fit_advice(c, tgt: Target) -> str:
  """The settings that lower a train step's memory per chip, those the config does not use already."""
  out = []
  if not model_config(c).remat:  # the TPU's platform choice turns it on already
    out.append("config.model.remat=True")
  data_parallel = tgt.chips // max(1, c.mesh.tensor)
  if c.optim.batch_size % (2 * c.train.microbatches * data_parallel) == 0:
    out.append(f"config.train.microbatches={2 * c.train.microbatches}")
  if c.mesh.fsdp in (1, -1) and c.mesh.tensor == 1 and tgt.chips > 1:
    out.append(f"config.mesh.fsdp={tgt.chips} with config.mesh.data=1")
  out.append(f"a smaller config.optim.batch_size (now {c.optim.batch_size})")
  return ", ".join(out[:-1]) + " or " + out[-1] if len(out) > 1 else out[0]


def does_not_fit(name: str, needed: float | None, tgt: Target, c) -> DoesNotFit:
  need = f"{needed / 1e9:.1f} GB" if needed else "more than the"
  return DoesNotFit(f"The {name} does not fit on {tgt.name}: it needs {need} of HBM per chip and a {tgt.chip.name} "
                    f"chip has {tgt.chip.hbm_bytes / 1e9:.1f} GB; set {fit_advice(c, tgt)}.")


COST_PROGRAMS = ("train_step", "eval_step", "prefill", "decode_step")


def compile_run(c, tgt: Target, log=lambda line: None) -> dict:
  """Compiles every program of the run `c` for `tgt`: {program: {hbm, fits, compile_s, flops, ...}}. Raises
  DoesNotFit (one sentence) when one needs more HBM per chip than the chip has; checks the inputs first."""
  c = c.copy_and_resolve_references()
  resolve_shape(c)
  config_lib.validate(c)
  mesh = make_mesh(c, tgt)
  check_batch(c, mesh)
  progs = programs(c, mesh)
  report, too_big, real = {}, [], {}
  for name, prog in progs.items():
    compiled, seconds = compile_program(prog)
    if compiled is None:
      too_big.append((name, needed_from_message(seconds)))
      continue
    real[name] = tpu_cost.costs(compiled)
    hbm = hbm_bytes(compiled)
    report[name] = dict(hbm=hbm, hbm_per_chip=hbm["total"], chip_hbm=tgt.chip.hbm_bytes, compile_s=seconds,
                        fits=hbm["total"] <= tgt.chip.hbm_bytes, tokens=prog.tokens, model_flops=prog.model_flops)
    if not report[name]["fits"]:
      too_big.append((name, hbm["total"]))
    log(f"compiled {name} in {seconds:.1f}s: {hbm['total'] / 1e9:.2f} GB per chip")
  if too_big:
    name, needed = too_big[0]
    raise does_not_fit(name.replace("_", " "), needed, tgt, c)
  names = [n for n in COST_PROGRAMS if n in progs]
  for name, cost in tpu_cost.program_costs(c, mesh, programs, compile_program, names, real).items():
    prog = progs[name]
    report[name].update(tpu_cost.summary(tgt.chip, cost, prog.tokens, prog.model_flops, tgt.chips))
  return report
