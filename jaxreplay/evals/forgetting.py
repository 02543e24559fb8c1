"""Forgetting metrics of a finetuned model against the pretraining run it started from.

- `prev_ntp_delta`: previous-dataset loss after finetuning minus the pretraining run's final loss on it;
- `compute_multiplier`: pretraining tokens at which the pretraining validation curve first reaches the
  finetuned model's previous-dataset loss, divided by all pretraining tokens (1 = no forgetting);
- `drift_ratio`: ‖θ − π_pre‖ / ‖π_pre − init‖, how far finetuning moved relative to all of pretraining.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import config as config_lib, rundir
from jaxreplay.io import read_metrics
from jaxreplay.models import decoder


def pretraining_curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, valid loss) of every evaluation among a run's logged rows, in order."""
  rows = [r for r in rows if "valid_ntp" in r and "tokens" in r and not r.get("final")]
  tokens = np.array([r["tokens"] for r in rows], dtype=np.float64)
  loss = np.array([r["valid_ntp"] for r in rows], dtype=np.float64)
  return tokens, loss


def compute_multiplier(curve_tokens, curve_loss, loss_after: float) -> float:
  """First point of the pretraining curve at or below `loss_after`, as a fraction of all its tokens."""
  if len(curve_tokens) == 0:
    return float("nan")
  total = curve_tokens[-1]
  reached = np.nonzero(curve_loss <= loss_after)[0]
  if len(reached) == 0:  # better than anywhere on the curve: nothing forgotten
    return 1.0
  i = reached[0]
  if i == 0:
    return float(curve_tokens[0] / total)
  # Interpolate linearly between the last point above and the first point at or below.
  t0, t1, l0, l1 = curve_tokens[i - 1], curve_tokens[i], curve_loss[i - 1], curve_loss[i]
  frac = (l0 - loss_after) / (l0 - l1) if l0 != l1 else 1.0
  return float(min(1.0, (t0 + frac * (t1 - t0)) / total))


def _sq_norm_diff(a, b) -> float:
  return float(sum(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def drift_ratio(params, frozen, init_params) -> float:
  return float(np.sqrt(_sq_norm_diff(params, frozen) / max(_sq_norm_diff(frozen, init_params), 1e-30)))


_init_params = jax.jit(decoder.init_params, static_argnums=0)  # one program per model for every run of a process


def forgetting_metrics(c, params, frozen, result: dict) -> dict:
  """Metrics that compare the finetuned `params` with the pretraining run in `c.init.from`."""
  prev_dir = c.init["from"]
  out = {}
  prev_final = rundir.read_final(prev_dir)
  if "prev_ntp" in result and "valid_ntp" in prev_final:
    out["prev_ntp_before"] = prev_final["valid_ntp"]
    out["prev_ntp_delta"] = result["prev_ntp"] - prev_final["valid_ntp"]
    tokens, loss = pretraining_curve(read_metrics(prev_dir))
    out["compute_multiplier"] = compute_multiplier(tokens, loss, result["prev_ntp"])
  prev_cfg = config_lib.from_json_file(rundir.config_file(prev_dir))
  model_cfg = decoder.ModelConfig.from_config(prev_cfg.model)
  init = _init_params(model_cfg, jax.random.key(prev_cfg.seed))
  out["drift_ratio"] = drift_ratio(params, frozen, init)
  return out
