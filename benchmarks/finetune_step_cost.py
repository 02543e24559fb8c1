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
import numpy as np

from jaxreplay import config as config_lib
from jaxreplay import metrics, optim, sharding, steps
from jaxreplay import model as model_lib

SIZES = {
    "small": dict(d_model=128, n_layers=4, head_dim=32, seq_len=128, batch=32),
    "medium": dict(d_model=256, n_layers=6, head_dim=64, seq_len=256, batch=16),
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="small", choices=sorted(SIZES))
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  s = SIZES[args.size]
  c = config_lib.default()
  c.model.update(d_model=s["d_model"], n_layers=s["n_layers"], head_dim=s["head_dim"], seq_len=s["seq_len"])
  c.optim.batch_size = s["batch"]
  platform = jax.default_backend()
  cfg = model_lib.ModelConfig.from_config(c.model, config_lib.compute_dtype_name(c, platform), platform)
  mesh = sharding.make_mesh(c.mesh)
  opt = optim.make_optimizer(c, 1000)
  init = lambda k: steps.init_state(cfg, opt, k)
  sh = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  frozen = jax.jit(init, out_shardings=sh)(jax.random.key(1))["params"]
  rng = np.random.default_rng(0)
  batch = sharding.put_batch(rng.integers(0, 4096, (s["batch"], s["seq_len"]), dtype=np.int32), mesh)
  replay = sharding.put_batch(rng.integers(0, 4096, (s["batch"], s["seq_len"]), dtype=np.int32), mesh)

  teacher_sh = sharding.batch_sharding(mesh, 3)
  teacher = jax.jit(lambda p, t: model_lib.logits(cfg, p, t), out_shardings=teacher_sh)(frozen, replay)

  compiled, states, teachers = {}, {}, {}
  for variant in ("none", "kl", "kl_sampled_teacher", "ntp", "replace"):
    method = "kl" if variant == "kl_sampled_teacher" else variant
    rc = config_lib.default().replay
    rc.unlock()
    rc.update(method=method, coeff=0.25 if method == "replace" else 1.0)
    teachers[variant] = teacher if variant == "kl_sampled_teacher" else None
    step = jax.jit(steps.make_train_step(steps.make_objective(cfg, rc), opt, optim.lr_schedule(c, 1000)),
                   in_shardings=(sh, sh["params"], sharding.batch_sharding(mesh), sharding.batch_sharding(mesh),
                                 teacher_sh if teachers[variant] is not None else None),
                   out_shardings=(sh, None))
    states[variant] = jax.jit(init, out_shardings=sh)(jax.random.key(0))
    compiled[variant] = step.lower(states[variant], frozen, batch, replay, teachers[variant]).compile()
    jax.block_until_ready(compiled[variant](states[variant], frozen, batch, replay, teachers[variant]))

  times = {m: [] for m in compiled}
  for _ in range(args.reps):
    for method, f in compiled.items():
      t0 = time.perf_counter()
      states[method], aux = f(states[method], frozen, batch, replay, teachers[method])
      jax.block_until_ready(aux)
      times[method].append(time.perf_counter() - t0)
  best = {m: min(t) for m, t in times.items()}
  print(json.dumps(dict(backend=platform, size=args.size, **s, step_s=best,
                        cost_vs_plain={m: round(best[m] / best["none"], 3) for m in best},
                        peak_memory_bytes=metrics.peak_memory_bytes()), indent=1))


if __name__ == "__main__":
  main()
