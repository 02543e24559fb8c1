"""The jitted functions of a stage: state initialisation, the train step and the eval step.

Pure functions over pytrees. `make_train_step` builds one step for a configuration; the stage jits it once
with explicit shardings and donated state, so nothing recompiles inside a run.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxreplay.models import decoder, losses


def init_state(model_cfg, optimizer, key, trainable_fn: Callable | None = None):
  """{params, opt_state, step}; `trainable_fn` maps fresh params to what is trained (LoRA adapters)."""
  params = decoder.init_params(model_cfg, key)
  if trainable_fn is not None:
    params = trainable_fn(params)
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def make_objective(model_cfg, replay_cfg, merge_fn: Callable | None = None):
  """loss(trainable, frozen, batch, replay, teacher=None) -> (loss, aux) for the finetuning method in `replay_cfg`.

  `merge_fn(trainable, frozen)` gives the model's parameters (identity for full finetuning, base + low-rank
  update for LoRA). The frozen model runs only for methods that need its predictions, never differentiated.
  `teacher` [B, T, V]: the frozen model's logits on the replay rows when already known (kept from sampling);
  with them, method kl skips the frozen forward pass.
  """
  method = replay_cfg.method if replay_cfg is not None else "none"
  coeff = float(replay_cfg.coeff) if replay_cfg is not None else 0.0
  merge = merge_fn or (lambda trainable, frozen: trainable)

  def objective(trainable, frozen, batch_BT, replay_BT, teacher_BTV=None):
    params = merge(trainable, frozen)
    aux = {}
    if method == "replace":
      batch_BT = losses.replace_rows(batch_BT, replay_BT, coeff)
    logits_BTV = decoder.logits(model_cfg, params, batch_BT)
    if method in ("kl", "ntp"):
      # A second forward pass rather than one over both batches concatenated: splitting the joint [2B, T, V]
      # logits afterwards would copy them, which costs more than reading the weights twice.
      replay_logits = decoder.logits(model_cfg, params, replay_BT)
    ntp = losses.next_token_loss(logits_BTV, batch_BT)
    aux["train_ntp"] = ntp
    loss = ntp
    if method == "kl":
      if teacher_BTV is None:
        teacher_BTV = decoder.logits(model_cfg, frozen, replay_BT)
      reg = losses.kl_loss(teacher_BTV, replay_logits)  # stop_gradient on the teacher inside
    elif method == "ntp":
      reg = losses.next_token_loss(replay_logits, replay_BT)
    elif method == "kl_downstream":
      reg = losses.kl_loss(decoder.logits(model_cfg, frozen, batch_BT), logits_BTV)
    else:
      reg = None
    if reg is not None:
      aux["train_reg"] = reg
      loss = ntp + coeff * reg
    aux["train_loss"] = loss
    return loss, aux

  return objective


def make_train_step(objective, optimizer, lr_schedule):
  def train_step(state, frozen, batch_BT, replay_BT, teacher_BTV=None):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (_, aux), grads = grad_fn(state["params"], frozen, batch_BT, replay_BT, teacher_BTV)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    aux["lr"] = lr_schedule(state["step"])
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), aux

  return train_step


def make_eval_step(model_cfg, with_kl: bool):
  """Sums over one batch: nll, second-half nll, position count, and KL to the frozen model if asked."""

  def eval_step(params, frozen, batch_BT):
    logits_BTV = decoder.logits(model_cfg, params, batch_BT)
    nll_BT = losses.token_nll(logits_BTV, batch_BT)
    half = nll_BT.shape[1] // 2
    out = dict(nll=nll_BT.sum(), nll_h2=nll_BT[:, half:].sum(),
               count=jnp.asarray(nll_BT.size, jnp.float32), count_h2=jnp.asarray(nll_BT[:, half:].size, jnp.float32))
    if with_kl:
      kl_BT = losses.kl_per_position(decoder.logits(model_cfg, frozen, batch_BT), logits_BTV)
      out["kl"] = kl_BT.sum()
    return out

  return eval_step
