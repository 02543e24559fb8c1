"""Cost of a finetuning step with a replay regularizer ÷ a plain step at the same downstream batch.

  python benchmarks/finetune_step_cost.py [--size=small] [--reps=5]

The replay batch equals the downstream batch. Steps are timed interleaved (plain, kl, ntp, plain, ...) so
that load on a shared machine hits every variant alike; the minimum over repetitions is reported.
`kl_sampled_teacher` is kl with the frozen model's logits on the replay rows passed in (as self-generated
replay keeps them from sampling, `replay.teacher`): no forward pass of the frozen model in the step.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import common
from jaxreplay import config as config_lib
from jaxreplay import metrics, sharding
from jaxreplay import model as model_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="small", choices=sorted(common.SIZES))
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  b = common.setup(args.size)
  s, cfg = b.size, b.model
  frozen = b.state(seed=1)["params"]
  batch, replay = b.batches(2)
  teacher = jax.jit(lambda p, t: model_lib.logits(cfg, p, t),
                    out_shardings=sharding.batch_sharding(b.mesh, 3))(frozen, replay)

  compiled, states, extra = {}, {}, {}
  for variant in ("none", "kl", "kl_sampled_teacher", "ntp", "replace"):
    method = "kl" if variant == "kl_sampled_teacher" else variant
    rc = config_lib.default().replay
    rc.unlock()
    rc.update(method=method, coeff=0.25 if method == "replace" else 1.0)
    sampled = variant == "kl_sampled_teacher"
    extra[variant] = (teacher,) if sampled else ()  # the teacher's logits, as kept from sampling
    step = b.train_step(rc, teacher=sampled)
    states[variant] = b.state()
    compiled[variant] = step.lower(states[variant], frozen, batch, replay, *extra[variant]).compile()
    states[variant], aux = compiled[variant](states[variant], frozen, batch, replay, *extra[variant])
    jax.block_until_ready(aux)

  times = {m: [] for m in compiled}
  for _ in range(args.reps):
    for method, f in compiled.items():
      t0 = time.perf_counter()
      states[method], aux = f(states[method], frozen, batch, replay, *extra[method])
      jax.block_until_ready(aux)
      times[method].append(time.perf_counter() - t0)
  best = {m: min(t) for m, t in times.items()}
  print(json.dumps(dict(backend=jax.default_backend(), size=args.size, **s, step_s=best,
                        cost_vs_plain={m: round(best[m] / best["none"], 3) for m in best},
                        peak_memory_bytes=metrics.peak_memory_bytes()), indent=1))


if __name__ == "__main__":
  main()
