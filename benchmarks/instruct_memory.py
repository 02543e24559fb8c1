"""Device memory of the instruct train step at Llama-3.2-1B shapes, from XLA's compiled buffer plan.

Compiles (never runs) the jitted step for abstract inputs on the current backend and prints JSON: argument,
output and temporary bytes for each (microbatches, remat) setting. On a CPU host this is XLA:CPU's plan, a
rough guide to a GPU's; run it on the accelerator for the real numbers.

  python benchmarks/instruct_memory.py [--microbatches 1,4] [--remat 0,1] [--batch 128] [--replay 32]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

import ml_collections

from jaxreplay import config as config_lib
from jaxreplay.train import optim, steps
from jaxreplay.models import decoder

LLAMA_32_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_mlp=8192,
                   norm_eps=1e-5, rope_base=500000.0, rope_llama3=(32.0, 1.0, 4.0, 8192.0), tie_embeddings=True,
                   mlp="swiglu", norm_scale=True, qk_norm=False)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--microbatches", default="1,4")
  p.add_argument("--remat", default="0,1")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--replay", type=int, default=32)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--method", default="kl")
  p.add_argument("--dtype", default="bfloat16")
  a = p.parse_args()
  for remat in map(int, a.remat.split(",")):
    for micro in map(int, a.microbatches.split(",")):
      cfg = decoder.ModelConfig(**LLAMA_32_1B, seq_len=a.seq, dtype=jnp.dtype(a.dtype), remat=bool(remat))
      c = config_lib.default()
      c.model.seq_len = a.seq
      c.optim.batch_size = a.batch
      opt, sched = optim.make_optimizer(c, 1000), optim.lr_schedule(c, 1000)
      params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
      state = dict(params=params, opt_state=jax.eval_shape(opt.init, params), step=jax.ShapeDtypeStruct((), jnp.int32))
      tok = jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32)
      batch = dict(tokens=tok, mask=jax.ShapeDtypeStruct((a.batch, a.seq), jnp.bool_), segments=tok)
      replay = jax.ShapeDtypeStruct((a.replay, a.seq), jnp.int32) if a.method != "none" else None
      replay_cfg = ml_collections.ConfigDict(dict(method=a.method, coeff=1.0))
      step = steps.make_train_step(steps.make_objective(cfg, replay_cfg), opt, sched, micro)
      t = time.time()
      m = jax.jit(step, donate_argnums=(0,)).lower(state, params, batch, replay).compile().memory_analysis()
      print(json.dumps(dict(backend=jax.default_backend(), remat=remat, microbatches=micro, batch=a.batch,
                            replay=a.replay, seq=a.seq, params=decoder.param_counts(cfg)["true"],
                            argument_gb=round(m.argument_size_in_bytes / 2**30, 2),
                            output_gb=round(m.output_size_in_bytes / 2**30, 2),
                            temp_gb=round(m.temp_size_in_bytes / 2**30, 2), compile_s=round(time.time() - t, 1))),
            flush=True)


if __name__ == "__main__":
  main()
