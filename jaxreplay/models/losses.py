"""Next-token loss, KL to the frozen pretrained model, and the finetuning objective with its regularizers.

Every per-position quantity is averaged over the T-1 positions that have a target (the last position of a
row predicts nothing), in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, tokens_BT):
  """Negative log-likelihood of each next token: [B, T-1].

  Computed as logsumexp − target logit over all T positions, dropping the last afterwards: slicing the
  [B, T, V] logits first would copy them, and log_softmax would materialise a second [B, T, V] array.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  next_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, :1]], axis=1)  # the last column: a dummy, dropped
  target_BT = jnp.take_along_axis(logits_BTV, next_BT[..., None], axis=-1)[..., 0]
  return (jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT)[:, :-1]


def next_token_loss(logits_BTV, tokens_BT, mask_BT=None):
  """Mean next-token cross-entropy; `mask_BT` (on targets, i.e. positions 1..T-1) weights positions."""
  nll_BT = token_nll(logits_BTV, tokens_BT)
  if mask_BT is None:
    return nll_BT.mean()
  w_BT = mask_BT[:, 1:].astype(jnp.float32)
  return (nll_BT * w_BT).sum() / jnp.maximum(w_BT.sum(), 1.0)


def kl_per_position(teacher_logits_BTV, student_logits_BTV):
  """KL(teacher ‖ student) summed over the vocabulary at each predicting position: [B, T-1].

  As Σ p_t·(z_t − z_s) − lse(z_t) + lse(z_s) on the raw logits z: no log-softmax arrays are materialised, one
  pass over [B, T, V] fewer than log_softmax twice (the KL's arithmetic is a visible part of a replay step).
  """
  z_t = teacher_logits_BTV.astype(jnp.float32)
  z_s = student_logits_BTV.astype(jnp.float32)
  lse_t = jax.nn.logsumexp(z_t, axis=-1)
  p_t = jnp.exp(z_t - lse_t[..., None])
  kl_BT = jnp.sum(p_t * (z_t - z_s), axis=-1) - lse_t + jax.nn.logsumexp(z_s, axis=-1)
  return kl_BT[:, :-1]


def kl_loss(teacher_logits_BTV, student_logits_BTV):
  """KL(π_pre ‖ π_θ) per position, mean over positions that have a target; no gradient to the teacher."""
  return _kl_mean(jax.lax.stop_gradient(teacher_logits_BTV), student_logits_BTV)


@jax.custom_vjp
def _kl_mean(teacher_logits_BTV, student_logits_BTV):
  return kl_per_position(teacher_logits_BTV, student_logits_BTV).mean()


def _kl_mean_fwd(teacher_logits_BTV, student_logits_BTV):
  """The loss and its whole gradient (softmax(z_s) − p_t) / positions in one pass, kept as the only residual.

  Autodiff would keep both probability arrays and rebuild the gradient in the backward pass: two more
  [B, T, V] buffers and passes over them, which on CPU cost as much as a third of a step's matmuls.
  """
  z_t = teacher_logits_BTV.astype(jnp.float32)
  z_s = student_logits_BTV.astype(jnp.float32)
  lse_t = jax.nn.logsumexp(z_t, axis=-1, keepdims=True)
  lse_s = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
  p_t = jnp.exp(z_t - lse_t)
  kl_BT = (jnp.sum(p_t * (z_t - z_s), axis=-1, keepdims=True) - lse_t + lse_s)[..., 0]
  B, T = kl_BT.shape
  w_T = (jnp.arange(T) < T - 1).astype(jnp.float32) / (B * (T - 1))  # the last position predicts nothing
  grad_BTV = (jnp.exp(z_s - lse_s) - p_t) * w_T[:, None]
  return kl_BT[:, :-1].mean(), grad_BTV.astype(student_logits_BTV.dtype)


def _kl_mean_bwd(grad_BTV, ct):
  return None, ct * grad_BTV


_kl_mean.defvjp(_kl_mean_fwd, _kl_mean_bwd)


def second_half_mean(values_BT):
  """Mean over the second half of the positions: how well the model uses long context."""
  half = values_BT.shape[1] // 2
  return values_BT[:, half:].mean()


def replace_rows(batch_BT, replay_BT, fraction: float):
  """Overwrites the first floor(fraction·B) rows of the downstream batch with replay rows; B is unchanged."""
  n = math.floor(round(fraction * batch_BT.shape[0], 9))  # round first: 0.29 · 100 is 28.999999999999996
  if n == 0:
    return batch_BT
  return batch_BT.at[:n].set(replay_BT[:n].astype(batch_BT.dtype))
