"""Our train step and sampler beside the paper's code (martin-marek/forgetting), interleaved in one process.

  git clone https://github.com/martin-marek/forgetting DIR     (fetched by you, not vendored; tested at 5cde463)
  python benchmarks/paper_reference.py --ref=DIR [--sizes=small,medium] [--steps=10] [--rounds=3] [--no-sample]

Train step: the paper's `train_single.train_step` (AdamW, next-token loss, no regularizer) in fp32 — its
`model.activ_dtype` set to float32, the dtype ours uses on CPU — against ours on the same size and batch.
Sampler: the paper's `sampling.sample` (a KV-cache while-loop) against `jaxreplay.models.sampler`, each drawing
B rows of T tokens from a dataset-id token. Each round times the paper's arm, then ours, so both see the same
load; prints per-round tokens/s and ratios (ours ÷ paper) with their median and spread as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as platform_mod
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import common
from jaxreplay import sharding
from jaxreplay.models import sampler

SAMPLE_BATCH = {"small": 32, "medium": 16}  # rows drawn per sampler call (sampling_throughput's shapes)


def import_paper(ref: str):
  """The paper's train_single and sampling modules from the checkout at `ref`. Modules that only its
  experiment driver uses (omegaconf, wandb, tqdm) are stood in for when missing: nothing timed here calls them."""
  if not os.path.exists(os.path.join(ref, "train_single.py")):
    print(f"error: --ref={ref} holds no train_single.py; pass a checkout of martin-marek/forgetting.",
          file=sys.stderr)
    sys.exit(2)
  for name in ("omegaconf", "wandb", "tqdm.auto"):
    try:
      __import__(name)
    except ImportError:
      stub = types.ModuleType(name)
      stub.OmegaConf = stub.tqdm = None
      sys.modules[name] = stub
  sys.path.insert(0, ref)
  import model as paper_model  # noqa: the paper's modules, importable only now
  import sampling as paper_sampling
  import train_single
  return paper_model, paper_sampling, train_single


def paper_config(size: str):
  s = common.SIZES[size]
  return types.SimpleNamespace(D=s["d_model"], L=s["n_layers"], H=s["head_dim"], T=s["seq_len"], V=4096,
                               remat=False, dp_shard=False, tp_size=1, activ_dtype="float32")


def timed(fn, n: int) -> float:
  """Seconds per call of fn(i) over n calls, after everything they return is ready."""
  t0 = time.perf_counter()
  out = [fn(i) for i in range(n)]
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def train_arms(size: str, paper) -> dict:
  """{name: (run(i) -> outputs)} for the two train steps, compiled and warmed up."""
  import optax
  paper_model, _, train_single = paper
  b = common.setup(size)
  state, batches, step = [b.state()], b.batches(2), b.train_step()
  step = step.lower(state[0], None, batches[0], None).compile()

  def ours(i):
    state[0], aux = step(state[0], None, batches[i % 2], None)
    return aux["train_loss"]

  cfg = paper_config(size)
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    weights = paper_model.create_sharded_model(cfg, jax.random.key(0))
    weights_pi = jax.tree.map(jnp.copy, weights)
    tx = optax.adamw(optax.warmup_constant_schedule(0.0, 1e-3, 1000), 0.9, 0.999, weight_decay=0.02)
    held = [weights, tx.init(weights)]
    forward = lambda *a, **k: paper_model.forward(cfg, *a, **k)
    xs = [jax.device_put(np.asarray(x), jax.sharding.PartitionSpec("data", None)) for x in batches]

  def theirs(i):
    with jax.set_mesh(mesh):
      held[0], held[1], loss, _, _ = train_single.train_step(forward, forward, tx, held[0], weights_pi, held[1],
                                                             xs[i % 2], None)
    return loss

  for fn in (ours, theirs, ours, theirs):  # compile and warm up
    jax.block_until_ready(fn(0))
  return dict(paper=theirs, ours=ours), b.size["batch"] * b.size["seq_len"]


def sampler_arms(size: str, paper) -> dict:
  paper_model, paper_sampling, _ = paper
  b = common.setup(size)
  B, T = SAMPLE_BATCH.get(size, common.SIZES[size]["batch"]), b.size["seq_len"]
  params = b.state()["params"]
  fn = sampler.make_sampler(b.model, sampler.SamplingConfig(temperature=1.0), B, 1, T, b.mesh)
  prompt = sharding.put_batch(jax.device_get(sampler.id_prompt(0, B)), b.mesh)
  program = fn.program.lower(params, prompt, fn.uniforms(jax.random.key(0))).compile()
  ours = lambda i: program(params, prompt, fn.uniforms(jax.random.key(i)))

  cfg = paper_config(size)
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    weights = paper_model.create_sharded_model(cfg, jax.random.key(0))
  forward = lambda *a, **k: paper_model.forward(cfg, *a, **k)
  init_kv = lambda B_, T_: paper_model.init_kv(cfg, B_, T_)
  tokens = jnp.zeros((B, T), jnp.int32)  # the id token 0 first, the rest sampled (the paper's synthetic batch)

  def theirs(i):
    with jax.set_mesh(mesh):
      return paper_sampling.sample(jax.random.key(i), forward, init_kv, weights, tokens, eos_id=-1, pad_id=0)

  for f in (ours, theirs):
    jax.block_until_ready(f(0))
  return dict(paper=theirs, ours=ours), B * (T - 1)


def interleave(arms: dict, tokens: int, calls: int, rounds: int) -> dict:
  rates = {name: [] for name in arms}
  for r in range(rounds):
    for name, fn in arms.items():
      rates[name].append(round(tokens / timed(fn, calls), 1))
      print(f"round {r + 1}: {name} {rates[name][-1]} tokens/s", file=sys.stderr, flush=True)  # progress
  ratios = [o / p for o, p in zip(rates["ours"], rates["paper"])]
  return dict(tokens_per_s=rates, ours_vs_paper=round(statistics.median(ratios), 4),
              ours_vs_paper_min=round(min(ratios), 4), ours_vs_paper_max=round(max(ratios), 4))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ref", required=True, help="a checkout of github.com/martin-marek/forgetting")
  p.add_argument("--sizes", default="small,medium")
  p.add_argument("--steps", type=int, default=10, help="train steps per arm per round")
  p.add_argument("--samples", type=int, default=1, help="sampler calls per arm per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no-sample", action="store_true", help="time the train steps only")
  args = p.parse_args()
  paper = import_paper(os.path.abspath(args.ref))
  load_before = os.getloadavg()
  results = []
  for size in args.sizes.split(","):
    row = dict(size=size, **common.SIZES[size])
    arms, tokens = train_arms(size, paper)
    row["train_step"] = interleave(arms, tokens, args.steps, args.rounds)
    if not args.no_sample:
      arms, tokens = sampler_arms(size, paper)
      rows = SAMPLE_BATCH.get(size, common.SIZES[size]["batch"])
      row["sampler"] = dict(batch=rows, **interleave(arms, tokens, args.samples, args.rounds))
    results.append(row)
  print(json.dumps(dict(backend=jax.default_backend(), machine=platform_mod.node(), cpus=os.cpu_count(),
                        load_avg_before=[round(x, 2) for x in load_before],
                        load_avg_after=[round(x, 2) for x in os.getloadavg()], results=results), indent=1))


if __name__ == "__main__":
  main()
