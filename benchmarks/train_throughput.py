"""Train-step throughput: tokens/s, MFU against a matmul peak measured in this process, compile time, memory.

  python benchmarks/train_throughput.py [--sizes=small,medium] [--steps=20] [--dtype=auto]

Prints one JSON object. MFU = model FLOPs/s (6·params + attention, forward and backward) ÷ the FLOP/s of
a square matmul in the same dtype, timed just before.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import config as config_lib
from jaxreplay import metrics, optim, sharding, steps
from jaxreplay import model as model_lib

SIZES = {
    "small": dict(d_model=128, n_layers=4, head_dim=32, seq_len=128, batch=32),
    "medium": dict(d_model=256, n_layers=6, head_dim=64, seq_len=256, batch=16),
    "paper6m": dict(d_model=256, n_layers=6, head_dim=64, seq_len=256, batch=256),
}


def bench(size: str, num_steps: int, dtype: str, peak: float) -> dict:
  s = SIZES[size]
  c = config_lib.default()
  c.model.update(d_model=s["d_model"], n_layers=s["n_layers"], head_dim=s["head_dim"], seq_len=s["seq_len"])
  c.optim.batch_size = s["batch"]
  c.stop.steps = 10_000
  mesh = sharding.make_mesh(c.mesh)
  cfg = model_lib.ModelConfig.from_config(c.model, config_lib.compute_dtype_name(c, jax.default_backend())
                                          if dtype == "auto" else dtype, jax.default_backend())
  opt = optim.make_optimizer(c, c.stop.steps)
  init = lambda k: steps.init_state(cfg, opt, k)
  abstract = jax.eval_shape(init, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=sh)(jax.random.key(0))
  step = jax.jit(steps.make_train_step(steps.make_objective(cfg, None), opt, optim.lr_schedule(c, c.stop.steps)),
                 in_shardings=(sh, None, sharding.batch_sharding(mesh), None), out_shardings=(sh, None),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batches = [sharding.put_batch(rng.integers(0, c.model.vocab_size, (s["batch"], s["seq_len"]), dtype=np.int32), mesh)
             for _ in range(4)]
  t0 = time.perf_counter()
  compiled = step.lower(state, None, batches[0], None).compile()
  compile_s = time.perf_counter() - t0
  state, aux = compiled(state, None, batches[0], None)  # warm-up
  jax.block_until_ready(aux)
  t0 = time.perf_counter()
  for i in range(num_steps):
    state, aux = compiled(state, None, batches[i % 4], None)
  jax.block_until_ready((state, aux))
  elapsed = time.perf_counter() - t0
  tokens_per_s = num_steps * s["batch"] * s["seq_len"] / elapsed
  flops = model_lib.flops_per_token(cfg)
  return dict(size=size, **s, dtype=str(cfg.dtype), params_paper=model_lib.param_counts(cfg)["paper"],
              compile_s=round(compile_s, 3), step_s=elapsed / num_steps, tokens_per_s=round(tokens_per_s, 1),
              mfu=round(tokens_per_s * flops / peak, 4))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="small,medium")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  args = p.parse_args()
  dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  n = 2048 if jax.default_backend() == "cpu" else 8192  # the reference: a 2048² fp32 matmul on CPU
  peak = metrics.measure_matmul_peak(jnp.dtype(dtype), n=n, seconds=1.0)
  results = [bench(size, args.steps, args.dtype, peak) for size in args.sizes.split(",")]
  peak_after = metrics.measure_matmul_peak(jnp.dtype(dtype), n=n, seconds=1.0)
  print(json.dumps(dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                        matmul_peak_flops=peak, matmul_peak_after_flops=peak_after,
                        peak_memory_bytes=metrics.peak_memory_bytes(), results=results), indent=1))


if __name__ == "__main__":
  main()
