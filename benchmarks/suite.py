"""Every benchmark of benchmarks/ at the sizes that matter on the platform found; prints ONE JSON object.

  python benchmarks/suite.py [--budget-s=290] [--only=train,kl,...]     (make bench)

CPU: today's sizes (the quickstart model; a few minutes on 2 cores). GPU/TPU: the paper's models D=256/L=6
(5.77M), D=512/L=8 and D=1024/L=16 (205M) in bf16 at batch 256 × 256 tokens, sampling at 1,024 rows × 256,
the KL step at replay batch = downstream batch, then the rest; ≤ 5 minutes on an H200.

Each benchmark runs in its own process (its own peak memory, no state shared), in order of importance, with
a timeout cut to what is left of `--budget-s`; one that fails or runs out of time is recorded as such and the
suite goes on. The device's peak FLOP/s is measured here with a large matmul in the compute dtype, before
and after the benchmarks, and each train size's MFU is recomputed against it (`mfu_vs_suite_peak`).
Only public, stable jax API is used here (the image's jax may be newer than the project's pin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# This process only measures the matmul peak: it must not take the accelerator's memory from the benchmarks.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, script, arguments, the most seconds it may take) in the order they run.
PLANS = {
    "cpu": [
        ("train_throughput", "train_throughput.py", ["--sizes=small", "--steps=5"], 240),
        ("finetune_step_cost", "finetune_step_cost.py", ["--size=small", "--reps=3"], 300),
        ("sampling_throughput", "sampling_throughput.py", ["--repeats=2", "--count=1"], 240),
        ("pack_throughput", "pack_throughput.py", [], 240),
        ("checkpoint_overhead", "checkpoint_overhead.py", ["--sizes=small", "--steps=10", "--repeats=1"], 240),
        ("data_throughput", "data_throughput.py", ["--tokens=4000000", "--seconds=0.5"], 120),
        ("instruct_memory", "instruct_memory.py", ["--microbatches=1", "--remat=1", "--batch=8", "--replay=8",
                                                         "--seq=128"], 240),
    ],
    "accelerator": [
        ("train_throughput", "train_throughput.py", ["--sizes=paper205m,paper6m,paper_d512", "--steps=10",
                                                             "--dtype=bfloat16"], 150),
        ("sampling_throughput", "sampling_throughput.py", ["--repeats=3", "--shapes=accelerator"], 90),
        ("finetune_step_cost", "finetune_step_cost.py", ["--size=paper6m", "--reps=5"], 90),
        ("pack_throughput", "pack_throughput.py", [], 60),
        ("checkpoint_overhead", "checkpoint_overhead.py", ["--sizes=paper6m", "--steps=10", "--repeats=1"], 60),
        ("data_throughput", "data_throughput.py", ["--seconds=1"], 45),
        ("instruct_memory", "instruct_memory.py", ["--microbatches=1,4", "--remat=0,1"], 60),
    ],
}
MIN_SECONDS = 20  # a benchmark is not started with less than this left of the budget


def parse_json(stdout: str):
  """The benchmark's one JSON object, or the objects of a benchmark that prints one a line."""
  start = stdout.find("{")
  if start < 0:
    raise ValueError("no JSON in its output")
  try:
    return json.loads(stdout[start:])
  except json.JSONDecodeError:
    return [json.loads(line) for line in stdout[start:].splitlines() if line.strip().startswith("{")]


def run_one(script: str, args: list, timeout: float) -> dict:
  path = os.path.join(HERE, script)
  if not os.path.exists(path):
    return dict(status="skipped", note=f"benchmarks/{script} does not exist in this tree")
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  t0 = time.perf_counter()
  try:
    out = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return dict(status="timed_out", timeout_s=round(timeout), args=args)
  wall = round(time.perf_counter() - t0, 1)
  if out.returncode:
    return dict(status="failed", returncode=out.returncode, wall_s=wall, args=args, stderr=out.stderr[-1500:])
  try:
    return dict(status="ok", wall_s=wall, args=args, result=parse_json(out.stdout))
  except ValueError as e:
    return dict(status="failed", wall_s=wall, args=args, note=str(e), stdout=out.stdout[-1500:])


def matmul_peak(dtype, n: int, seconds: float) -> float:
  """FLOP/s of an n×n×n matmul in `dtype`, the best of timed batches of calls (one dispatch each)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best, end = float("inf"), time.perf_counter() + seconds
  while time.perf_counter() < end:
    t0 = time.perf_counter()
    for _ in range(4):
      out = f(a, a)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / 4)
  return 2.0 * n ** 3 / best


def add_mfu(entry: dict, peak: float) -> None:
  """train_throughput's MFU against the suite's peak (it measures its own too, in its own process)."""
  if entry.get("status") != "ok":
    return
  for r in entry["result"].get("results", []):
    r["mfu_vs_suite_peak"] = round(r["mfu"] * entry["result"]["matmul_peak_flops"] / peak, 4)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--budget-s", type=float, default=290.0, help="the whole suite's time, peak included")
  p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
  args = p.parse_args()
  t_start = time.perf_counter()
  backend = jax.default_backend()
  plan = PLANS["cpu" if backend == "cpu" else "accelerator"]
  if args.only:
    plan = [x for x in plan if x[0] in args.only.split(",")]
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  n = 2048 if backend == "cpu" else 8192
  peak = matmul_peak(dtype, n, 2.0)
  out = dict(suite="benchmarks/suite.py", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             backend=backend, device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
             jax=jax.__version__, cpu_count=os.cpu_count(), load_average_1min=round(os.getloadavg()[0], 2),
             matmul_peak=dict(dtype=jnp.dtype(dtype).name, n=n, flops=peak), budget_s=args.budget_s,
             benchmarks={})
  for name, script, bench_args, cap in plan:
    left = args.budget_s - (time.perf_counter() - t_start) - 10  # 10 s kept for the closing peak
    if left < MIN_SECONDS:
      out["benchmarks"][name] = dict(status="not_run", note=f"{left:.0f} s of the budget left")
      continue
    out["benchmarks"][name] = run_one(script, bench_args, min(cap, left))
    print(f"suite: {name}: {out['benchmarks'][name]['status']}", file=sys.stderr, flush=True)
  out["matmul_peak"]["flops_after"] = matmul_peak(dtype, n, 1.0)
  if "train_throughput" in out["benchmarks"]:
    add_mfu(out["benchmarks"]["train_throughput"], peak)
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
