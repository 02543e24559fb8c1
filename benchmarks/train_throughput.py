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

import common
from jaxreplay.train import metrics
from jaxreplay.models import decoder


def bench(size: str, num_steps: int, dtype: str, peak: float) -> dict:
  b = common.setup(size, dtype)
  s, cfg = b.size, b.model
  state, batches, step = b.state(), b.batches(4), b.train_step()
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
  flops = decoder.flops_per_token(cfg)
  return dict(size=size, **s, dtype=str(cfg.dtype), params_paper=decoder.param_counts(cfg)["paper"],
              compile_s=round(compile_s, 3), step_s=elapsed / num_steps, tokens_per_s=round(tokens_per_s, 1),
              mfu=round(tokens_per_s * flops / peak, 4))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {sorted(common.SIZES)}")
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
