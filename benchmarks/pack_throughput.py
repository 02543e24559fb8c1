"""Sweep stages as packs against their runs one by one: wall time, tokens/s per member, the pack's MFU.

  python benchmarks/pack_throughput.py [--arms=finetune,pretrain64,pretrain128] [--jobs=1] [--repeats=1]
                                       [--ft_tokens=65536] [--pre_steps=60] [--parent_steps=8]

Defaults are shrunk to finish in minutes on a loaded 2-core CPU (repro_tpp's finetune is 600,000 tokens).

Both arms of each comparison run in this one invocation, interleaved (lone, packed, lone, packed, ...), through
the real CLI (`jaxreplay sweep --pack=1` against `--pack=N`, the same --jobs), each on a fresh copy of one
set-up workdir (the parents, and a warm persistent compile cache of the set-up only):
  finetune     the finetuning stage of sweeps/repro_tpp.py (16 runs of the D=64 model; its 4 parents are
               pretrained once in the set-up, for a few steps each);
  pretrainD    a pretraining stage of 8 runs (2 seeds × 4 learning rates) of the :small model at width D.
Per member: the median of the logged tokens/s over the runs' steady steps (a packed member's tokens/s is its
pack's step rate × its own tokens); pack MFU = members × a member's MFU. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, "sweeps")

FINETUNE = """
import sys
sys.path.insert(0, {sweeps!r})
import repro_tpp

def get_sweep(arg=""):
  s = repro_tpp.get_sweep("")
  pre, ft = s.stages
  # Short parents (set-up only; the finetuning stage is what is compared): stop.steps instead of their TPP.
  pre.base.optim.warmup_tokens = 0
  pre.grid = [{{"stop.tokens_per_param": 0.0, "stop.steps": {pre_ft_steps!r} * (k + 1)}} for k in range(len(repro_tpp.TPP))]
  ft.base.stop.tokens = {ft_tokens!r}
  ft.base.log.every_steps = 4  # tokens/s rows to take medians of (the first holds the compile)
  return s
"""

PRETRAIN = """
import sys
sys.path.insert(0, {sweeps!r})
import _paper
from jaxreplay.experiments import sweeps

def get_sweep(arg=""):
  c = _paper.config("en", True, steps={steps!r})
  c.model.d_model = {d!r}
  c.log.every_steps = 4
  c.eval.every_tokens = 10 ** 9  # evaluations at the end only: the stage's training is what is compared
  s = sweeps.Sweep()
  s.stage("pretrain", c, sweeps.product({{"seed": [0, 1]}}, {{"optim.lr": [3e-4, 1e-3, 3e-3, 1e-2]}}))
  return s
"""


def sweep(spec: str, workdir: str, *args) -> float:
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={workdir}", *args],
                     capture_output=True, text=True, cwd=ROOT)
  if r.returncode != 0:
    raise RuntimeError(f"sweep {spec} {args} failed: {(r.stderr or r.stdout)[-2000:]}")
  return time.perf_counter() - t0


def member_rates(workdir: str, stage: str) -> dict:
  """Median tokens/s and MFU per run of the stage (rows after the first logged one, which holds the compile)."""
  rates, mfus, members = [], [], []
  root = os.path.join(workdir, "runs", stage)
  for dirpath, _, files in os.walk(root):
    if "metrics.jsonl" not in files:
      continue
    with open(os.path.join(dirpath, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f if l.strip()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]
    if rows:
      rates.append(statistics.median(r["tokens_per_s"] for r in rows))
      mfus.append(statistics.median(r.get("mfu", 0.0) for r in rows))
      final = os.path.join(dirpath, "final.json")  # a packed member records its pack's size there
      if os.path.exists(final):
        with open(final) as f:
          members.append(json.load(f).get("pack_members", 1))
  if not rates:
    return {}
  size = statistics.median(members) if members else 1
  return dict(runs=len(rates), tokens_per_s_per_member=statistics.median(rates),
              mfu_per_member=statistics.median(mfus), pack_size=size, pack_mfu=statistics.median(mfus) * size)


def compare(name: str, spec: str, setup: str, stage: str, pack: int, a) -> dict:
  arms = {"lone": [], "packed": []}
  for rep in range(a.repeats):
    for arm, n in (("lone", 1), ("packed", pack)):
      work = os.path.join(os.path.dirname(setup), f"{name}_{arm}_{rep}")
      shutil.copytree(setup, work)
      wall = sweep(spec, work, f"--pack={n}", f"--jobs={a.jobs}")
      arms[arm].append(dict(wall_s=wall, **member_rates(work, stage)))
      shutil.rmtree(work, ignore_errors=True)
  best = {arm: min(v, key=lambda r: r["wall_s"]) for arm, v in arms.items()}
  out = dict(arms=arms, jobs=a.jobs, pack=pack,
             wall_speedup=best["lone"]["wall_s"] / best["packed"]["wall_s"])
  if best["lone"].get("tokens_per_s_per_member") and best["packed"].get("tokens_per_s_per_member"):
    # member-steps per second of the pack (its step rate × its members) against a lone run's steps per second
    out["member_step_ratio"] = (best["packed"]["tokens_per_s_per_member"] * best["packed"]["pack_size"]
                                / best["lone"]["tokens_per_s_per_member"])
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--arms", default="finetune", help="finetune,pretrain64,pretrain128 (default: finetune only)")
  p.add_argument("--jobs", type=int, default=1)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--ft_tokens", type=int, default=65_536, help="finetuning length (repro_tpp: 600,000)")
  p.add_argument("--parent_steps", type=int, default=8, help="the k-th parent trains k × this many steps (set-up)")
  p.add_argument("--pre_steps", type=int, default=60)
  p.add_argument("--pack", type=int, default=16)
  a = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="pack_throughput_")
  out = dict(platform=None, arms={})
  try:
    for arm in a.arms.split(","):
      spec = os.path.join(tmp, f"{arm}.py")
      setup = os.path.join(tmp, f"{arm}_setup")
      if arm == "finetune":
        with open(spec, "w") as f:
          f.write(textwrap.dedent(FINETUNE.format(sweeps=SWEEPS, pre_ft_steps=a.parent_steps, ft_tokens=a.ft_tokens)))
        t0 = time.perf_counter()
        sweep(spec, setup, "--only=pretrain/*", "--pack=4", f"--jobs={a.jobs}")
        res = compare(arm, spec, setup, "finetune", a.pack, a)
        res["setup_s"] = time.perf_counter() - t0
      else:
        d = int(arm.removeprefix("pretrain"))
        with open(spec, "w") as f:
          f.write(textwrap.dedent(PRETRAIN.format(sweeps=SWEEPS, steps=a.pre_steps, d=d)))
        sweep(spec, setup, "--dry-run")
        os.makedirs(setup, exist_ok=True)
        res = compare(arm, spec, setup, "pretrain", min(a.pack, 8), a)
      out["arms"][arm] = res
      print(json.dumps({arm: res}), file=sys.stderr, flush=True)
    import jax
    out["platform"] = jax.default_backend()
    out["cpu_count"] = os.cpu_count()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
