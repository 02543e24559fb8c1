"""A stage's evaluations and the stops that read them.

Every eval set (token rows, or chat rows with their loss mask) gives NAME_ntp (mean next-token loss on the
trained positions), NAME_ntp_h2 (its second half), NAME_acc (next-token accuracy) and, when finetuning,
NAME_kl (KL from the frozen model π_pre). Forgetting probes: with eval.replay_rows, rows sampled once from π_pre
(`self_*`, prompted as self-generated replay is) and held-out real replay text (`real_*`, chat runs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import config as config_lib, sharding
from jaxreplay.models import sampler


def put(batch, mesh):
  """This process's rows (an array or a dict of arrays) as a global batch on the mesh; device arrays as they are."""
  if isinstance(batch, dict):
    return {k: put(v, mesh) for k, v in batch.items()}
  return batch if isinstance(batch, jax.Array) else sharding.put_batch(np.asarray(batch), mesh)


def self_probe(c, model_cfg, frozen, prompt_id: int, mesh):
  """eval.replay_rows rows (rounded up to the data-parallel devices) sampled once from π_pre from `prompt_id`,
  with the replay sampling settings and a key of their own: the same rows for every arm of a sweep."""
  div = sharding.batch_divisor(mesh)
  n = -(-c.eval.replay_rows // div) * div
  sc = sampler.SamplingConfig(temperature=float(c.replay.temperature), top_k=int(c.replay.top_k),
                              top_p=float(c.replay.top_p))
  prompt = np.full((n, 1), prompt_id, np.int32)
  prompt = jax.make_array_from_callback(prompt.shape, sharding.batch_sharding(mesh), lambda i: prompt[i])
  key = jax.random.fold_in(jax.random.key(c.seed), 2)
  return sampler.make_sampler(model_cfg, sc, n, 1, model_cfg.seq_len, mesh)(frozen, prompt, key)


def evaluate_sets(eval_sets: dict, eval_fn, params, frozen, mesh) -> dict:
  """{NAME_ntp, NAME_ntp_h2, NAME_acc[, NAME_kl]} for each eval set."""
  out = {}
  for name, batches in eval_sets.items():
    sums = jax.device_get(functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b),
                                           (eval_fn(params, frozen, put(batch, mesh)) for batch in batches)))
    count = max(float(sums["count"]), 1.0)
    out[f"{name}_ntp"] = float(sums["nll"] / count)
    out[f"{name}_ntp_h2"] = float(sums["nll_h2"] / max(float(sums["count_h2"]), 1.0))
    out[f"{name}_acc"] = float(sums["correct"] / count)
    if "kl" in sums:
      out[f"{name}_kl"] = float(sums["kl"] / count)
  return out


def check_stops(c, ev: dict, extra: dict):
  """The stop an evaluation triggers ('target', 'target_loss', 'early_stop') or None; `extra` keeps the best
  loss and the evaluations since it (saved in the checkpoint)."""
  s = c.stop
  if s.get("target_metric"):
    if s.target_metric not in ev:
      raise config_lib.ConfigError(f"config.stop.target_metric={s.target_metric!r} is not an evaluated metric: "
                                   f"use one of {', '.join(sorted(ev))}.")
    value = ev[s.target_metric]
    if value >= s.target if config_lib.target_mode(c) == "max" else value <= s.target:
      return "target"
  loss = ev.get("valid_ntp")
  if loss is None:
    return None
  if s.target_loss and loss <= s.target_loss:
    return "target_loss"
  if extra["best"] is None or loss < extra["best"]:
    extra["best"], extra["evals_since_best"] = loss, 0
  else:
    extra["evals_since_best"] += 1
  if s.early_stop_evals and extra["evals_since_best"] >= s.early_stop_evals:
    return "early_stop"
  return None
