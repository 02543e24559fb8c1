"""The jitted functions of a stage: state initialisation, the train step and the eval step.

Pure functions over pytrees. `make_train_step` builds one step for a configuration; the stage jits it once
with explicit shardings and donated state, so nothing recompiles inside a run.

A batch is token rows [B, T] or a dict {tokens, mask, segments}: `mask` [B, T] marks the tokens whose
prediction is trained (chat data: the assistant's), `segments` [B, T] the packed examples of a row (attention
stays inside one; positions restart at each). Rows without them train every position of one sequence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxreplay.models import decoder, losses


def as_batch(batch) -> dict:
  """{tokens, mask, segments} with None for what the rows do not carry."""
  if isinstance(batch, dict):
    return dict(tokens=batch["tokens"], mask=batch.get("mask"), segments=batch.get("segments"))
  return dict(tokens=batch, mask=None, segments=None)


def forward(model_cfg, params, batch: dict):
  segments = batch["segments"]
  positions = decoder.segment_positions(segments) if segments is not None else None
  return decoder.logits(model_cfg, params, batch["tokens"], segments, positions)


def init_state(model_cfg, optimizer, key, trainable_fn: Callable | None = None, frozen=None):
  """{params, opt_state, step}: fresh parameters (or a copy of `frozen`), mapped by `trainable_fn` to what is
  trained (LoRA adapters)."""
  params = decoder.init_params(model_cfg, key) if frozen is None else frozen
  if trainable_fn is not None:
    params = trainable_fn(params)
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def make_objective(model_cfg, replay_cfg, merge_fn: Callable | None = None):
  """loss(trainable, frozen, batch, replay, teacher=None, ntp_weight=1) -> (loss, aux) for the finetuning method in
  `replay_cfg`.

  `merge_fn(trainable, frozen)` gives the model's parameters (identity for full finetuning, base + low-rank
  update for LoRA). The frozen model runs only for methods that need its predictions, never differentiated.
  `teacher` [B, T, V]: the frozen model's logits on the replay rows when already known (kept from sampling);
  with them, method kl skips the frozen forward pass. `ntp_weight`: a microbatch's share of the step's target
  tokens × microbatches (1 without microbatching). `coeff` overrides replay.coeff with a traced value (a packed
  step gives each member its own).
  """
  method = replay_cfg.method if replay_cfg is not None else "none"
  coeff = float(replay_cfg.coeff) if replay_cfg is not None else 0.0
  merge = merge_fn or (lambda trainable, frozen: trainable)

  def objective(trainable, frozen, batch, replay_BT, teacher_BTV=None, ntp_weight=1.0, coeff=coeff):
    params = merge(trainable, frozen)
    batch = as_batch(batch)
    aux = {}
    if method == "replace":
      batch = dict(batch, tokens=losses.replace_rows(batch["tokens"], replay_BT, coeff))
    logits_BTV = forward(model_cfg, params, batch)
    if method in ("kl", "ntp"):
      # A second forward pass rather than one over both batches concatenated: splitting the joint [2B, T, V]
      # logits afterwards would copy them, which costs more than reading the weights twice.
      replay_logits = decoder.logits(model_cfg, params, replay_BT)
    ntp = ntp_weight * losses.next_token_loss(logits_BTV, batch["tokens"], batch["mask"])
    aux["train_ntp"] = ntp
    loss = ntp
    if method == "kl":
      if teacher_BTV is None:
        teacher_BTV = decoder.logits(model_cfg, frozen, replay_BT)
      reg = losses.kl_loss(teacher_BTV, replay_logits)  # stop_gradient on the teacher inside
    elif method == "ntp":
      reg = losses.next_token_loss(replay_logits, replay_BT)
    elif method == "kl_downstream":
      reg = losses.kl_loss(forward(model_cfg, frozen, batch), logits_BTV)
    else:
      reg = None
    if reg is not None:
      aux["train_reg"] = reg
      loss = ntp + coeff * reg
    aux["train_loss"] = loss
    return loss, aux

  return objective


def _split(x, n: int):
  return None if x is None else x.reshape(n, x.shape[0] // n, *x.shape[1:])


def make_train_step(objective, optimizer, lr_schedule, microbatches: int = 1):
  """One optimizer step. With microbatches > 1 a scan accumulates the chunks' gradients (gradient accumulation),
  each chunk's next-token loss weighted by its share of the step's target tokens, so the step equals one over
  the whole batch."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def gradients(params, frozen, batch, replay_BT, teacher_BTV):
    if microbatches == 1:
      (_, aux), grads = grad_fn(params, frozen, batch, replay_BT, teacher_BTV)
      return grads, aux
    batch = as_batch(batch)
    chunks = jax.tree.map(lambda x: _split(x, microbatches), batch)
    if batch["mask"] is not None:
      counts = chunks["mask"][:, :, 1:].astype(jnp.float32).sum(axis=(1, 2))
      weights = counts * microbatches / jnp.maximum(counts.sum(), 1.0)
    else:
      weights = jnp.ones((microbatches,), jnp.float32)
    xs = (chunks, _split(replay_BT, microbatches), _split(teacher_BTV, microbatches), weights)

    def body(acc, chunk):
      (_, aux), g = grad_fn(params, frozen, *chunk)
      return jax.tree.map(jnp.add, acc, (g, aux)), None

    first = jax.tree.map(lambda x: x[0], xs)
    shapes = jax.eval_shape(lambda: grad_fn(params, frozen, *first))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
    (grads, aux), _ = jax.lax.scan(body, zeros, xs)
    return jax.tree.map(lambda x: x / microbatches, (grads, aux))

  def train_step(state, frozen, batch, replay_BT, teacher_BTV=None):
    grads, aux = gradients(state["params"], frozen, batch, replay_BT, teacher_BTV)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    aux["lr"] = lr_schedule(state["step"])
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), aux

  return train_step


def make_eval_step(model_cfg, with_kl: bool):
  """Sums over one batch of the trained positions (all, or the mask's): nll, second-half nll, correct next-token
  predictions, position counts, and KL to the frozen model if asked."""

  def eval_step(params, frozen, batch):
    batch = as_batch(batch)
    logits_BTV = forward(model_cfg, params, batch)
    tokens = batch["tokens"]
    nll_BT = losses.token_nll(logits_BTV, tokens)  # [B, T-1]: position t predicts token t+1
    w_BT = (jnp.ones(nll_BT.shape, jnp.float32) if batch["mask"] is None else
            batch["mask"][:, 1:].astype(jnp.float32))
    half = w_BT.at[:, :w_BT.shape[1] // 2].set(0.0)
    hit_BT = (jnp.argmax(logits_BTV[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    out = dict(nll=(nll_BT * w_BT).sum(), nll_h2=(nll_BT * half).sum(), correct=(hit_BT * w_BT).sum(),
               count=w_BT.sum(), count_h2=half.sum())
    if with_kl:
      kl_BT = losses.kl_per_position(forward(model_cfg, frozen, batch), logits_BTV)
      out["kl"] = (kl_BT * w_BT).sum()
    return out

  return eval_step
