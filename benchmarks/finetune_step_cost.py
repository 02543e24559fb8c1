"""Cost of a finetuning step with a replay regularizer ÷ a plain step at the same downstream batch.

  python benchmarks/finetune_step_cost.py [--size=small] [--reps=5]

The replay batch equals the downstream batch. Steps are timed interleaved (plain, kl, ntp, plain, ...) so
that load on a shared machine hits every variant alike; the minimum over repetitions is reported.
`kl_sampled_teacher` is kl with the frozen model's logits on the replay rows passed in (as self-generated
replay keeps them from sampling, `replay.teacher`): no forward pass of the frozen model in the step.
`kl_half_replay` is the same with half as many replay rows (`replay.batch_size` = batch / 2).

A train step is not all that self-generated replay costs: its rows must be sampled first. `sampling_s` is the
time to sample one replay batch with its logits (the sampler `replay_self` uses), and
`kl_self_replay_with_sampling` = (kl_sampled_teacher step + sampling_s) ÷ plain step: the cost per step when
each run samples its own replay (a sweep sharing the disk cache of samples pays a fraction of sampling_s).
`--baseline=REV` adds the plain and kl steps of steps.py/losses.py as of git revision REV (`none@REV`,
`kl@REV`), timed in the same interleaved loop, so that a change to the step is measured against the old one.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import common
from jaxreplay import config as config_lib
from jaxreplay import sharding
from jaxreplay.train import metrics
from jaxreplay.models import decoder
from jaxreplay.models import sampler as sampler_lib


def sampling_seconds(b: common.Setup, params, rows: int, reps: int) -> float:
  """Best time to sample `rows` replay rows with their logits, as replay_self does (prompt: a dataset id)."""
  T = b.size["seq_len"]
  sampler = sampler_lib.make_sampler(b.model, sampler_lib.SamplingConfig(), rows, 1, T, b.mesh, return_logits=True)
  prompt = sharding.put_batch(jax.device_get(sampler_lib.id_prompt(0, rows)), b.mesh)
  run = sampler.program.lower(params, prompt, sampler.uniforms(jax.random.key(0))).compile()
  jax.block_until_ready(run(params, prompt, sampler.uniforms(jax.random.key(0))))
  times = []
  for i in range(reps):
    u = sampler.uniforms(jax.random.key(i + 1))
    t0 = time.perf_counter()
    jax.block_until_ready(run(params, prompt, u))
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="small", choices=sorted(common.SIZES))
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--baseline", default="", help="a git revision whose steps.py/losses.py run as extra arms")
  args = p.parse_args()
  print(json.dumps(measure(args.size, args.reps, args.baseline), indent=1))


def measure(size: str, reps: int, baseline: str = "") -> dict:
  b = common.setup(size)
  s, cfg = b.size, b.model
  frozen = b.state(seed=1)["params"]
  batch, replay = b.batches(2)
  half = replay[: s["batch"] // 2]
  teacher_of = jax.jit(lambda p, t: decoder.logits(cfg, p, t), out_shardings=sharding.batch_sharding(b.mesh, 3))

  compiled, args_of, states = {}, {}, {}
  variants = ["none", "kl", "kl_sampled_teacher", "kl_half_replay", "ntp", "replace"]
  old = common.steps_at(baseline) if baseline else None
  variants += [f"none@{baseline}", f"kl@{baseline}"] if baseline else []
  for variant in variants:
    method, _, rev = variant.partition("@")
    method = method if method in ("none", "kl", "ntp", "replace") else "kl"
    rc = config_lib.default().replay
    rc.unlock()
    rc.update(method=method, coeff=0.25 if method == "replace" else 1.0)
    rows = half if variant == "kl_half_replay" else replay
    sampled = variant in ("kl_sampled_teacher", "kl_half_replay")
    args_of[variant] = (frozen, batch, rows) + ((teacher_of(frozen, rows),) if sampled else ())
    step = b.train_step(rc, teacher=sampled, steps_module=old if rev else common.steps)
    states[variant] = b.state()
    compiled[variant] = step.lower(states[variant], *args_of[variant]).compile()
    states[variant], aux = compiled[variant](states[variant], *args_of[variant])
    jax.block_until_ready(aux)

  times = {m: [] for m in compiled}
  for _ in range(reps):
    for variant, f in compiled.items():
      t0 = time.perf_counter()
      states[variant], aux = f(states[variant], *args_of[variant])
      jax.block_until_ready(aux)
      times[variant].append(time.perf_counter() - t0)
  best = {m: min(t) for m, t in times.items()}
  cost = {m: round(best[m] / best["none"], 3) for m in best}
  sampling_s = sampling_seconds(b, frozen, s["batch"], reps)
  cost["kl_self_replay_with_sampling"] = round((best["kl_sampled_teacher"] + sampling_s) / best["none"], 3)
  if baseline:  # the old kl step against the old plain one, and today's steps against the old ones
    cost[f"kl@{baseline}"] = round(best[f"kl@{baseline}"] / best[f"none@{baseline}"], 3)
    cost[f"none@{baseline}"] = round(best[f"none@{baseline}"] / best["none"], 3)
  return dict(backend=jax.default_backend(), size=size, **s, step_s=best, sampling_s=round(sampling_s, 4),
              cost_vs_plain=cost, peak_memory_bytes=metrics.peak_memory_bytes())


if __name__ == "__main__":
  main()
