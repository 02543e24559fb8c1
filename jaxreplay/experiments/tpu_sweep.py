"""A sweep's distinct programs compiled once each for a TPU topology (`jaxreplay sweep FILE --dry-run --target=T`):
which runs do not fit, and the sweep's price in chip-hours from the roofline times.

Runs share a program when everything that shapes it is equal: the model, the batch, microbatches, the mesh, the
replay method's rows and teacher, LoRA's rank, the eval batch. Learning rates, coefficients, seeds and lengths
change numbers in a program, never its memory or its cost, so one compile stands for all of them.
"""

from __future__ import annotations

import json

import ml_collections

from jaxreplay import config as config_lib
from jaxreplay.experiments import sweeps, tpu_compile
from jaxreplay.models import decoder
from jaxreplay.train import stage as stage_lib


def program_key(c) -> str:
  r = c.replay
  shape = dict(model=c.model.to_dict(), batch=c.optim.batch_size, microbatches=c.train.microbatches,
               mesh=c.mesh.to_dict(), finetune=bool(c.init["from"] or c.model.path), lora=c.lora.rank,
               eval_batch=c.eval.batch_size, replay=dict(method=r.method, source=r.source, rows=r.batch_size,
                                                         buffer=r.buffer, top_k=r.top_k, top_p=r.top_p,
                                                         teacher=config_lib.replay_teacher(c)))
  return json.dumps(shape, sort_keys=True)


def chip_hours(c, report: dict, chips: int) -> float:
  """Roofline chip-hours of one run: its steps × the train step's time, plus its sampler refills."""
  params = lambda: decoder.param_counts(tpu_compile.model_config(c))[c.model.param_count]
  steps = stage_lib.total_steps(c, params, None) or 0
  seconds = steps * report["train_step"]["roofline_s"]
  if "sampler" in report:
    seconds += -(-steps // c.replay.buffer) * report["sampler"]["roofline_s"]
  return seconds * chips / 3600


def compile_sweep(sweep, tgt: tpu_compile.Target, log=lambda line: None) -> dict:
  """{programs: [{runs, report, chip_hours}], too_big: [{runs, error}], chip_hours}: each distinct program of
  `sweep` (a Sweep, FILE.py[:ARG], or a list of its runs) compiled once."""
  if isinstance(sweep, list):
    runs = sweep
  else:
    runs = sweeps.expand(sweep if isinstance(sweep, sweeps.Sweep) else sweeps.load(sweep))
  groups: dict[str, list] = {}
  for run in runs:
    groups.setdefault(program_key(ml_collections.ConfigDict(run.config)), []).append(run)
  out = dict(target=tgt.name, runs=len(runs), programs=[], too_big=[], chip_hours=0.0)
  for members in groups.values():
    names = [r.name for r in members]
    log(f"compiling the program of {len(names)} run(s), e.g. {names[0]}")
    c = ml_collections.ConfigDict(members[0].config)
    try:
      report = tpu_compile.compile_run(c, tgt)
    except tpu_compile.DoesNotFit as e:
      out["too_big"].append(dict(runs=names, error=str(e)))
      continue
    hours = sum(chip_hours(ml_collections.ConfigDict(r.config), report, tgt.chips) for r in members)
    out["programs"].append(dict(runs=names, report=report, chip_hours=hours))
    out["chip_hours"] += hours
  return out


def check_fits(result: dict):
  """DoesNotFit naming the runs of the first program that does not fit (after every program was compiled)."""
  if result["too_big"]:
    first = result["too_big"][0]
    more = sum(len(t["runs"]) for t in result["too_big"]) - len(first["runs"])
    runs = ", ".join(first["runs"][:3]) + (f" and {len(first['runs']) - 3} more" if len(first["runs"]) > 3 else "")
    raise tpu_compile.DoesNotFit(f"Runs {runs} do not fit{f' (and {more} other runs)' if more else ''}: "
                                 + first["error"][0].lower() + first["error"][1:])


def format_result(result: dict, chips: int) -> str:
  """One line per distinct program (its runs, HBM per chip, the train step's roofline time and MFU, chip-hours),
  one per program that does not fit, and the sweep's roofline chip-hours."""
  lines = [f"{result['target']}: {len(result['programs']) + len(result['too_big'])} distinct programs for "
           f"{result['runs']} runs, each compiled once"]
  for p in result["programs"]:
    r = p["report"]
    step = r["train_step"]
    hbm = max(x["hbm_per_chip"] for x in r.values())
    lines.append(f"  fits      {len(p['runs']):>4} runs (e.g. {p['runs'][0]}): {hbm / 1e9:.2f} of "
                 f"{step['chip_hbm'] / 1e9:.1f} GB/chip, train step {step['roofline_s'] * 1e3:.3f} ms roofline "
                 f"({step.get('mfu', 0):.0%} MFU), {p['chip_hours']:.3g} chip-hours")
  for t in result["too_big"]:
    lines.append(f"  TOO BIG   {len(t['runs']):>4} runs: {', '.join(t['runs'])}")
  priced = sum(len(p["runs"]) for p in result["programs"])
  lines.append(f"= {result['chip_hours']:,.3g} chip-hours ({result['chip_hours'] / chips:,.3g} slice-hours of "
               f"{chips} chips) at the roofline step times, for the {priced} runs that fit (runs of unknown length "
               "count 0)")
  return "\n".join(lines)
