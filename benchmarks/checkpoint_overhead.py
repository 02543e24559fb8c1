"""What checkpointing adds to training: the time of K train steps with an asynchronous save started before
them (and waited for after them) minus the time of K steps without, spread over the default save interval.

  python benchmarks/checkpoint_overhead.py [--sizes=small,medium] [--steps=40] [--repeats=5]

Prints one JSON object. `overhead_fraction` = added time per save ÷ (steps per interval × step time), where
the interval is config.checkpoint's default (every_steps, or every_minutes if that comes first); the target
is ≤ 0.05. The save includes everything the training loop pays: the integrity checksums, the device-to-host
copy, and the background write competing with the train steps for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax

import common
from jaxreplay.train import checkpoint as ckpt_lib
from jaxreplay import config as config_lib
from jaxreplay.models import decoder


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench(size: str, num_steps: int, repeats: int) -> dict:
  b = common.setup(size)
  c = b.config
  state, batches, train_step = b.state(), b.batches(4), b.train_step()

  def run_steps(state, n):
    for i in range(n):
      state, aux = train_step(state, None, batches[i % 4], None)
    jax.block_until_ready((state, aux))
    return state

  workdir = tempfile.mkdtemp(prefix="ckpt_overhead_")
  ck = ckpt_lib.Checkpointer(workdir, c.checkpoint)
  state = run_steps(state, 2)  # compile
  ck.save(1, state, {}, force=True)  # compile the checksums, warm up orbax
  ck.wait()

  base, with_save, blocking, background = [], [], [], []
  save_step = 2
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = run_steps(state, num_steps)
    base.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    ck.save(save_step, state, {"elapsed_s": 0.0}, force=True)
    blocking.append(time.perf_counter() - t0)
    state = run_steps(state, num_steps)
    ck.wait()  # a write still running after K steps counts against the save
    with_save.append(time.perf_counter() - t0)
    save_step += 1

    t0 = time.perf_counter()  # the background write alone, nothing competing
    ck.save(save_step, state, {}, force=True)
    ck.wait()
    background.append(time.perf_counter() - t0)
    save_step += 1
  size_bytes = _dir_bytes(os.path.join(ck.directory, str(save_step - 1)))
  ck.close()

  step_s = statistics.median(base) / num_steps
  # Paired differences (each save run right after its own baseline) cancel slow drifts in machine load.
  added_s = max(0.0, statistics.median(w - b for w, b in zip(with_save, base)))
  # Bound that holds however noisy the timings: the save stalls training for its blocking part plus, at
  # worst, the whole background write.
  bound_s = statistics.median(blocking) + statistics.median(background)
  interval_steps = c.checkpoint.every_steps
  if c.checkpoint.every_minutes:
    interval_steps = min(interval_steps, max(1, int(60 * c.checkpoint.every_minutes / step_s)))
  return dict(
      size=size, params=decoder.param_counts(b.model)["true"], checkpoint_bytes=size_bytes,
      step_s=step_s, save_blocking_s=statistics.median(blocking), save_total_s=statistics.median(background),
      added_per_save_s=added_s, added_per_save_steps=added_s / step_s,
      default_interval_steps=interval_steps,
      overhead_fraction=added_s / (interval_steps * step_s),
      overhead_fraction_bound=bound_s / (interval_steps * step_s),
      overhead_fraction_every_100_steps=added_s / (min(100, interval_steps) * step_s),
      timings_s=dict(steps=base, steps_with_save=with_save),
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="small")
  p.add_argument("--steps", type=int, default=20, help="train steps timed after each save (K)")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  results = [bench(size, args.steps, args.repeats) for size in args.sizes.split(",")]
  print(json.dumps(dict(backend=jax.default_backend(), devices=jax.device_count(),
                        default_checkpoint=config_lib.default().checkpoint.to_dict(), target=0.05,
                        load_average=os.getloadavg()[0], cpus=os.cpu_count(),
                        ok=all(r["overhead_fraction"] <= 0.05 for r in results), results=results), indent=2))


if __name__ == "__main__":
  main()
