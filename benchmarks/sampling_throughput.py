"""Sampled tokens/s of `jaxreplay.models.sampler` at the issue's two shapes; prints one JSON object.

Each shape runs in its own subprocess so that its peak memory (process max RSS, taken after the sampler's
first run) is its own. Compile time is measured apart from the timed runs; a run samples every position after
the one-token prompt (T-1 tokens per row), as self-generated replay does. Targets are 2× the paper's code
measured on this machine. On a shared machine wall-clock rates follow the load; `tokens_per_cpu_s` and the
speedup over a straightforward decode (`reference_program`, timed interleaved with ours) vary much less.

  python benchmarks/sampling_throughput.py [--repeats=3] [--only=0|1]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = [
    dict(d_model=128, n_layers=4, seq_len=128, batch=32, paper_tokens_per_s=6_500, target_tokens_per_s=13_000),
    dict(d_model=256, n_layers=6, seq_len=256, batch=16, paper_tokens_per_s=800, target_tokens_per_s=1_600),
]
# On a GPU/TPU (`--shapes=accelerator`): the paper's 5.77M model sampling 1,024 rows of 256 tokens; target 1M tokens/s.
ACCELERATOR_SHAPES = [
    dict(d_model=256, n_layers=6, seq_len=256, batch=1024, paper_tokens_per_s=None, target_tokens_per_s=1_000_000),
]
VOCAB = 4096


def reference_program(cfg, B: int, T: int):
  """The straightforward decode, for comparison under the same machine load: one `model.apply` per token on the
  model's own [L, B, S, K, H] cache, attention over the whole cache, Gumbel-max draws over the vocabulary."""
  import jax
  import jax.numpy as jnp
  from jaxreplay.models import decoder

  def run(params, key):
    tokens = jnp.zeros((B, T), jnp.int32)

    def body(pos, carry):
      tokens, cache, key = carry
      key, sub = jax.random.split(key)
      prev = jax.lax.dynamic_slice_in_dim(tokens, pos - 1, 1, axis=1)
      logits, cache = decoder.apply(cfg, params, prev, cache=cache, cache_index=pos - 1)
      new = jax.random.categorical(sub, logits[:, 0]).astype(jnp.int32)
      return jax.lax.dynamic_update_slice(tokens, new[:, None], (0, pos)), cache, key

    return jax.lax.fori_loop(1, T, body, (tokens, decoder.init_cache(cfg, B, T), key))[0]

  return jax.jit(run)


def measure(shape: dict, repeats: int) -> dict:
  import jax
  from jaxreplay import config as config_lib
  from jaxreplay import sharding
  from jaxreplay.models import decoder, sampler

  c = config_lib.default()
  c.model.update(d_model=shape["d_model"], n_layers=shape["n_layers"], seq_len=shape["seq_len"], vocab_size=VOCAB)
  dtype = config_lib.compute_dtype_name(c, jax.default_backend())
  cfg = decoder.ModelConfig.from_config(c.model, dtype, jax.default_backend())  # the platform's choices
  mesh = sharding.make_mesh(c.mesh)
  abstract = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
  params = jax.jit(lambda: decoder.init_params(cfg, jax.random.key(0)),
                   out_shardings=sharding.param_shardings(abstract, mesh))()
  B, T = shape["batch"], shape["seq_len"]
  sc = sampler.SamplingConfig(temperature=1.0)
  prompt = sharding.put_batch(jax.device_get(sampler.id_prompt(0, B)), mesh)
  fn = sampler.make_sampler(cfg, sc, B, 1, T, mesh)

  t0 = time.perf_counter()
  u = fn.uniforms(jax.random.key(0))
  compiled = fn.program.lower(params, prompt, u).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(params, prompt, fn.uniforms(jax.random.key(1))))  # warm-up run

  peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reference exists
  reference = reference_program(cfg, B, T).lower(params, jax.random.key(0)).compile()
  jax.block_until_ready(reference(params, jax.random.key(0)))
  times, cpu_times, ref_cpu_times = [], [], []
  for i in range(repeats):  # interleaved with the reference, so that both see the same machine load
    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(compiled(params, prompt, fn.uniforms(jax.random.key(2 + i))))
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    c0 = time.process_time()
    jax.block_until_ready(reference(params, jax.random.key(2 + i)))
    ref_cpu_times.append(time.process_time() - c0)
  assert out.shape == (B, T)
  tokens = B * (T - 1)
  best = min(times)
  rate = tokens / best
  result = dict(
      shape=dict(d_model=cfg.d_model, n_layers=cfg.n_layers, seq_len=T, batch=B, vocab_size=VOCAB,
                 compute_dtype=dtype),
      platform=jax.default_backend(), devices=len(jax.devices()),
      tokens_per_run=tokens, seconds_per_run=[round(t, 4) for t in times],
      tokens_per_s=round(rate), tokens_per_s_median=round(tokens / sorted(times)[len(times) // 2]),
      cpu_seconds_per_run=[round(t, 4) for t in cpu_times],
      tokens_per_cpu_s=round(tokens / min(cpu_times)),  # less sensitive to other processes on a shared machine
      reference_tokens_per_cpu_s=round(tokens / min(ref_cpu_times)),
      speedup_over_reference=round(min(ref_cpu_times) / min(cpu_times), 2),
      load_average_1min=round(os.getloadavg()[0], 2), cpu_count=os.cpu_count(),
      compile_s=round(compile_s, 3),
      paper_tokens_per_s=shape["paper_tokens_per_s"], target_tokens_per_s=shape["target_tokens_per_s"],
      meets_target=bool(rate >= shape["target_tokens_per_s"]),
      peak_rss_mib=round(peak_rss_mib, 1),
  )
  if mem is not None:
    result["program_memory_mib"] = dict(
        arguments=round(mem.argument_size_in_bytes / 2**20, 2), outputs=round(mem.output_size_in_bytes / 2**20, 2),
        temporaries=round(mem.temp_size_in_bytes / 2**20, 2))
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", type=int, default=-1, help="measure one shape in this process")
  parser.add_argument("--shapes", default="cpu", choices=("cpu", "accelerator"))
  parser.add_argument("--count", type=int, default=0, help="measure the first COUNT shapes (0: all)")
  args = parser.parse_args()
  shapes = SHAPES if args.shapes == "cpu" else ACCELERATOR_SHAPES
  if args.only >= 0:
    print(json.dumps(measure(shapes[args.only], args.repeats)))
    return
  results = []
  for i in range(args.count or len(shapes)):
    out = subprocess.run([sys.executable, __file__, f"--only={i}", f"--repeats={args.repeats}",
                          f"--shapes={args.shapes}"],
                         capture_output=True, text=True, env=dict(os.environ))
    if out.returncode:
      sys.exit(f"shape {i} failed:\n{out.stderr[-3000:]}")
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(json.dumps(dict(benchmark="sampling_throughput", results=results,
                        all_meet_target=all(r["meets_target"] for r in results)), indent=2))


if __name__ == "__main__":
  main()
