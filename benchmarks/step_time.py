"""Wall and CPU seconds per plain train step, using only what benchmarks/common.py has offered since 07ae685
(`setup`, `state`, `batches`, `train_step`), so that `compare.py --same-script` can run this script against
older revisions' code.

  python benchmarks/step_time.py [--sizes=small,medium] [--steps=10]

CPU seconds (this process's, all threads) follow the work done far more than the load of other processes
on a shared machine, which mostly stretches wall time; both are printed, as tokens/s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

import common


def measure(size: str, steps: int) -> dict:
  b = common.setup(size)
  state, batches, step = b.state(), b.batches(2), b.train_step()
  step = step.lower(state, None, batches[0], None).compile()
  state, aux = step(state, None, batches[0], None)  # warm-up
  jax.block_until_ready(aux)
  walls, cpus = [], []
  for i in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, aux = step(state, None, batches[i % 2], None)
    jax.block_until_ready(aux)
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  tokens = b.size["batch"] * b.size["seq_len"]
  median = lambda xs: sorted(xs)[len(xs) // 2]
  return dict(size=size, tokens_per_s=round(tokens / median(walls), 1), tokens_per_s_best=round(tokens / min(walls), 1),
              tokens_per_cpu_s=round(tokens / median(cpus), 1), tokens_per_cpu_s_best=round(tokens / min(cpus), 1))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="small,medium")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  print(json.dumps(dict(load_avg=os.getloadavg()[0], results=[measure(s, args.steps) for s in args.sizes.split(",")]),
                   indent=1))


if __name__ == "__main__":
  main()
