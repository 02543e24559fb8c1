"""Batch-size-aware AdamW and learning-rate schedules.

Adam's decays can be given as half-lives in tokens, β = 0.5^(n / t½) with n = tokens per optimizer step, so
that changing the batch size keeps the averaging horizon fixed (Marek et al. 2025). Small batches push β₂
towards 1, where float32 cannot resolve 1−β₂ (β₂ even rounds to 1.0 once t½/n ≳ 2.4e7). Every decay here is
therefore derived on the host in float64 and, when float32 would lose precision, the moments are updated
with 1−β and bias-corrected with −expm1(k·log β) instead of optax's β and 1−β^k.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib

_LN_HALF = math.log(0.5)
# Below this 1−β, float32's spacing near 1 (2^-24) resolves 1−β worse than 1e-4 relative, so optax's
# arithmetic (which rounds β and β^k to float32) is replaced by the accurate one (`scale_by_adam`).
MIN_ONE_MINUS_BETA_F32 = 2.0**-24 * 1e4


# ----------------------------------------------------------------------------------------------- decays

def _tokens(value: float, name: str = "tokens_per_step") -> float:
  """A finite number of tokens > 0 (a half-life, or tokens per step = global batch size × sequence length)."""
  n = float(value)
  if not (math.isfinite(n) and n > 0):
    raise ValueError(f"{name}={value!r} is invalid: it must be a finite number of tokens > 0.")
  return n


def _check_decay(beta: float, allow_one: bool = False) -> float:
  b = float(beta)
  if not (0.0 <= b <= 1.0 if allow_one else 0.0 <= b < 1.0):
    raise ValueError(f"decay beta={beta!r} is invalid: it must lie in [0, {'1]' if allow_one else '1)'}.")
  return b


def halflife_to_decay(t_half_tokens: float, tokens_per_step: float) -> float:
  """β = 0.5^(n/t): the per-step decay whose EMA forgets half its weight after t½ tokens (float64)."""
  return 0.5 ** (_tokens(tokens_per_step) / _tokens(t_half_tokens, "t_half_tokens"))


def halflife_to_one_minus_decay(t_half_tokens: float, tokens_per_step: float) -> float:
  """1−β = −expm1(n·ln½/t), exact in float64 even when β itself is 1 to many digits."""
  return -math.expm1(_tokens(tokens_per_step) * _LN_HALF / _tokens(t_half_tokens, "t_half_tokens"))


def decay_to_halflife(beta: float, tokens_per_step: float) -> float:
  """t½ = n·ln½/ln β in tokens (β=0 → 0, β=1 → inf), for logging what a directly given β means."""
  b, n = _check_decay(beta, allow_one=True), _tokens(tokens_per_step)
  if b == 0.0:
    return 0.0
  if b == 1.0:
    return math.inf
  return n * _LN_HALF / math.log(b)


def rescale_decay(beta: float, old_tokens_per_step: float, new_tokens_per_step: float) -> float:
  """β at a new batch with the same half-life: β^(n_new/n_old) (the paper's Eq. 2)."""
  new = _tokens(new_tokens_per_step, "new_tokens_per_step")
  return _check_decay(beta) ** (new / _tokens(old_tokens_per_step, "old_tokens_per_step"))


def decay_pair(c: ml_collections.ConfigDict, which: str) -> tuple[float, float]:
  """(β, 1−β) for b1 or b2 from the config, both float64; a half-life > 0 wins over the direct value."""
  t_half = c.optim[f"{which}_half_life_tokens"]
  if t_half > 0:
    n = config_lib.tokens_per_step(c)
    return halflife_to_decay(t_half, n), halflife_to_one_minus_decay(t_half, n)
  try:
    b = _check_decay(c.optim[which])
  except ValueError:
    raise ConfigError(f"config.optim.{which}={c.optim[which]} must lie in [0, 1) "
                                 f"(or set config.optim.{which}_half_life_tokens > 0).") from None
  return b, 1.0 - b


def resolved_betas(c: ml_collections.ConfigDict) -> tuple[float, float]:
  """The (β₁, β₂) this config trains with, as Python floats (log them: they depend on the batch size)."""
  return decay_pair(c, "b1")[0], decay_pair(c, "b2")[0]


# ------------------------------------------------------------------------------------------------- adam

def adam_kind(c: ml_collections.ConfigDict) -> tuple:
  """What about Adam is compiled in, not a value: optax's arithmetic or the accurate one, and the latter's form
  of each moment update (by 1−β or by β). A pack's members must agree on it."""
  (_, omb1), (_, omb2) = decay_pair(c, "b1"), decay_pair(c, "b2")
  if min(omb1, omb2) >= MIN_ONE_MINUS_BETA_F32:
    return ("optax",)
  return ("accurate", omb1 <= 0.5, omb2 <= 0.5)


def hyperparams(c: ml_collections.ConfigDict) -> dict:
  """The values `adamw` is built from, Python floats (a pack member's are these rounded to float32, as a lone
  run's constants are): Adam's decays (optax's arithmetic takes 1 − β from β, as optax.scale_by_adam does, the
  accurate one β from 1 − β, with log β for its bias correction), ε and the weight decay."""
  (b1, omb1), (b2, omb2) = decay_pair(c, "b1"), decay_pair(c, "b2")
  if adam_kind(c)[0] == "optax":
    omb1, omb2 = 1.0 - b1, 1.0 - b2
  else:
    b1, b2 = 1.0 - omb1, 1.0 - omb2
  return dict(b1=b1, omb1=omb1, b2=b2, omb2=omb2, log_b1=log_decay(omb1), log_b2=log_decay(omb2),
              eps=float(c.optim.eps), weight_decay=float(c.optim.weight_decay))


def scale_by_adam(kind: tuple, hp: dict) -> optax.GradientTransformation:
  """Adam's scaling with its constants `hp` given as floats (a lone run) or traced arrays (a pack member).

  ('optax',): optax.scale_by_adam's arithmetic with 1−β given (direct betas reproduce optax.adamw bit for bit).
  'accurate' stays so as β → 1: moments move by m += (1−β)(g − m) for β ≥ ½ (1−β from the host), and bias
  correction is 1−β^k = −expm1(k·log β). State is `optax.ScaleByAdamState` either way (checkpoints agree)."""
  accurate = kind[0] == "accurate"
  ema1 = ema_form(accurate and kind[1], hp["omb1"], hp["b1"])
  ema2 = ema_form(accurate and kind[2], hp["omb2"], hp["b2"])

  def init_fn(params):
    mu, nu = jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    mu = jax.tree.map(lambda g, m: ema1(m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: ema2(v, g * g), updates, state.nu)
    count = optax.safe_increment(state.count)
    if accurate:  # β = 0 gives log β = -inf and 1−β^k = 1
      k = count.astype(jnp.float32)
      bc1, bc2 = -jnp.expm1(k * hp["log_b1"]), -jnp.expm1(k * hp["log_b2"])
    else:
      bc1, bc2 = 1 - hp["b1"] ** count, 1 - hp["b2"] ** count  # optax.tree.bias_correction's
    updates = jax.tree.map(
        lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + hp["eps"]), mu, nu)
    nu = jax.tree.map(lambda v, old: v.astype(old.dtype), nu, state.nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_form(by_one_minus_beta: bool, one_minus_beta, beta):
  """x ← βx + (1−β)y in the form float32 keeps accurate: for β ≥ ½ (by_one_minus_beta) the decay is carried by
  1−β alone (float32 β would round it), otherwise by both, as optax does (β = 0 gives y exactly)."""
  if by_one_minus_beta:
    return lambda x, y: x + one_minus_beta * (y - x)
  return lambda x, y: one_minus_beta * y + beta * x


def log_decay(one_minus_beta: float) -> float:
  """log β from 1−β (−inf for β = 0), as the accurate Adam's bias correction uses it."""
  return math.log1p(-one_minus_beta) if one_minus_beta < 1.0 else -math.inf


def adamw(kind: tuple, hp: dict, grad_clip: float, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The chain clip → Adam → decoupled weight decay × LR (optax.adamw's semantics), from `hyperparams`' values:
  floats for a lone run, one member's traced float32 values inside a pack's step (train/pack_step.py)."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts += [scale_by_adam(kind, hp), optax.add_decayed_weights(hp["weight_decay"]),
            optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: Optional[int]) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping; optax's Adam arithmetic where float32 represents both decays
  well (1−β ≥ MIN_ONE_MINUS_BETA_F32), the accurate one otherwise."""
  return adamw(adam_kind(c), hyperparams(c), float(c.optim.grad_clip), lr_schedule(c, total_steps))


# -------------------------------------------------------------------------------------------- schedules

def warmup_steps(c: ml_collections.ConfigDict) -> int:
  """Warmup in steps: warmup_tokens / tokens_per_step rounded, at least 1 step unless warmup_tokens is 0."""
  tokens = c.optim.warmup_tokens
  if tokens <= 0:
    return 0
  return max(1, int(round(tokens / config_lib.tokens_per_step(c))))


def lr_schedule(c: ml_collections.ConfigDict, total_steps: Optional[int]) -> optax.Schedule:
  """Linear warmup from 0 (in tokens), then constant, cosine to 0 at total_steps, or warmup-stable-decay.

  wsd decays linearly to 0 over the final decay_fraction of total_steps. total_steps=None (open-ended
  runs: target loss, early stopping, wall time) only works with the constant schedule.
  """
  o = c.optim
  peak, kind, warm = float(o.lr), o.schedule, warmup_steps(c)
  if kind not in config_lib.SCHEDULES:
    raise ConfigError(f"config.optim.schedule={kind!r}: use one of {', '.join(config_lib.SCHEDULES)}.")
  if kind != "constant":
    if total_steps is None:
      raise ConfigError(
          f"config.optim.schedule={kind!r} decays to 0 at the last step, but this run has no fixed length: "
          "set one of config.stop.tokens/tokens_per_param/epochs/steps, or use schedule 'constant'.")
    total = int(total_steps)
    if total < 1:
      raise ValueError(f"total_steps={total_steps!r} is invalid: a run needs at least 1 step.")
    decay_steps = max(1, int(round(o.decay_fraction * total))) if kind == "wsd" else total - warm
    if total - decay_steps < warm or decay_steps < 1:
      raise ConfigError(
          f"config.optim.warmup_tokens={o.warmup_tokens} is {warm} steps, which leaves no room for the "
          f"{kind} decay in a run of {total} steps: lower warmup_tokens"
          + (" or config.optim.decay_fraction." if kind == "wsd" else " or train for longer."))
    decay_start = total - decay_steps

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    scale = jnp.minimum(s / warm, 1.0) if warm else jnp.ones_like(s)
    if kind == "cosine":
      frac = jnp.clip((s - decay_start) / decay_steps, 0.0, 1.0)
      scale = scale * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif kind == "wsd":
      scale = scale * (1.0 - jnp.clip((s - decay_start) / decay_steps, 0.0, 1.0))
    return peak * scale

  return schedule


def describe(c: ml_collections.ConfigDict) -> dict:
  """The realized decays, their half-lives in tokens and the warmup, for the run's log."""
  n = config_lib.tokens_per_step(c)
  b1, b2 = resolved_betas(c)
  return dict(b1=b1, b2=b2, b1_half_life_tokens=decay_to_halflife(b1, n),
              b2_half_life_tokens=decay_to_halflife(b2, n), tokens_per_step=n, warmup_steps=warmup_steps(c))

