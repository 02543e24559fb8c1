"""The jitted pieces of instruct finetuning (`instruct.py`): objective, train step, eval steps, replay sources.

Pure functions over pytrees, as `steps.py` for the paper's model, with the chat batch's loss mask and packed
segments, and an exact microbatched step (gradient accumulation) for 1B-scale models on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreplay import config as config_lib, sharding
from jaxreplay.data import chat as chat_data
from jaxreplay.models import decoder, losses, sampler


# -------------------------------------------------------------------------------------------------- steps

def _forward(cfg, params, tokens, segments):
  return decoder.logits(cfg, params, tokens, segments, decoder.segment_positions(segments))


def make_objective(cfg, method: str, coeff: float):
  """loss(params, frozen, batch, replay_BT) -> (loss, aux): masked chat NTP + coeff · replay regulariser."""

  def objective(params, frozen, batch, replay_BT, ntp_weight=1.0):
    tokens, mask, segments = batch["tokens"], batch["mask"], batch["segments"]
    aux = {}
    if method in ("kl", "ntp"):
      B = tokens.shape[0]
      both = _forward(cfg, params, jnp.concatenate([tokens, replay_BT]),
                      jnp.concatenate([segments, jnp.ones_like(replay_BT)]))
      logits, replay_logits = both[:B], both[B:]
    else:
      logits = _forward(cfg, params, tokens, segments)
    # ntp_weight: a microbatch's share of the step's target tokens × microbatches (1 without microbatching).
    ntp = ntp_weight * losses.next_token_loss(logits, tokens, mask)
    loss = aux["train_ntp"] = ntp
    if method == "kl":
      teacher = decoder.logits(cfg, frozen, replay_BT)
      aux["train_reg"] = losses.kl_loss(teacher, replay_logits)
    elif method == "ntp":
      aux["train_reg"] = losses.next_token_loss(replay_logits, replay_BT)
    if "train_reg" in aux:
      loss = ntp + coeff * aux["train_reg"]
    aux["train_loss"] = loss
    return loss, aux

  return objective


def make_train_step(objective, optimizer, lr_schedule, microbatches: int):
  """One optimizer step. With microbatches > 1 a scan accumulates the chunks' gradients, each chunk's chat loss
  weighted by its share of the step's target tokens, so the step equals one over the whole batch."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state, frozen, batch, replay_BT):
    if microbatches == 1:
      (_, aux), grads = grad_fn(state["params"], frozen, batch, replay_BT)
    else:
      split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])
      counts = split(batch["mask"][:, 1:]).astype(jnp.float32).sum(axis=(1, 2))
      weights = counts * microbatches / jnp.maximum(counts.sum(), 1.0)
      chunks = (jax.tree.map(split, batch), None if replay_BT is None else split(replay_BT), weights)

      def body(acc, chunk):
        (_, aux), g = grad_fn(state["params"], frozen, *chunk)
        return jax.tree.map(jnp.add, acc, (g, aux)), None

      zeros = jax.eval_shape(lambda: grad_fn(state["params"], frozen, *jax.tree.map(lambda x: x[0], chunks)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
      (grads, aux), _ = jax.lax.scan(body, zeros, chunks)
      grads, aux = jax.tree.map(lambda x: x / microbatches, (grads, aux))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    aux.update(grad_norm=optax.tree.norm(grads), lr=lr_schedule(state["step"]))
    return dict(params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                step=state["step"] + 1), aux

  return train_step


def make_eval_step(cfg):
  """Sums over a chat batch: masked NLL, correct next-token predictions, target count."""

  def eval_step(params, batch):
    tokens, mask = batch["tokens"], batch["mask"]
    logits = _forward(cfg, params, tokens, batch["segments"])
    w = mask[:, 1:].astype(jnp.float32)
    nll = losses.token_nll(logits, tokens)
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    return dict(nll=(nll * w).sum(), correct=(hit * w).sum(), count=w.sum())

  return eval_step


def make_replay_eval_step(cfg):
  def eval_step(params, frozen, replay_BT):
    logits = decoder.logits(cfg, params, replay_BT)
    return dict(nll=losses.token_nll(logits, replay_BT).sum(),
                kl=losses.kl_per_position(decoder.logits(cfg, frozen, replay_BT), logits).sum(),
                count=jnp.asarray(replay_BT.shape[0] * (replay_BT.shape[1] - 1), jnp.float32))

  return eval_step


# ------------------------------------------------------------------------------------------------- replay

class SelfReplay:
  """BOS-prompted samples of the frozen model; rows of step s are samples s·R .. s·R+R-1, drawn a buffer at a
  time with fold_in(key, buffer index): a pure function of the step, so resuming needs no saved state."""

  def __init__(self, cfg, frozen, c, mesh, bos_id: int, key):
    if bos_id < 0:
      raise config_lib.ConfigError("Self-generated replay starts from the BOS token, but this checkpoint's "
                                   "config.json names no bos_token_id: use replay.source='real'.")
    self.cfg, self.frozen, self.mesh, self.key = cfg, frozen, mesh, key
    self.R, self.buffer = c.replay.batch_size, c.replay.buffer
    self.sampling = sampler.SamplingConfig(temperature=float(c.replay.temperature), top_k=int(c.replay.top_k))
    self.bos_id = bos_id
    self._cache = (None, None)
    self._take = jax.jit(lambda rows, at: jax.lax.dynamic_slice_in_dim(rows, at, self.R),
                         out_shardings=sharding.batch_sharding(mesh))

  def rows(self, index: int):
    """Buffer number `index` as a global device array [buffer, T]."""
    if self._cache[0] != index:
      self._cache = (index, sample_bos(self.cfg, self.frozen, self.buffer, self.bos_id, self.sampling, self.mesh,
                                       jax.random.fold_in(self.key, index)))
    return self._cache[1]

  def next(self, step: int):
    first = step * self.R
    return self._take(self.rows(first // self.buffer), first % self.buffer)


def sample_bos(cfg, frozen, n: int, bos_id: int, s: sampler.SamplingConfig, mesh, key):
  """n full-length rows sampled from BOS alone; each process supplies its share of the prompt rows."""
  local = np.full((n, 1), bos_id, np.int32)
  local = np.array_split(local, jax.process_count())[jax.process_index()]
  return sampler.sample(cfg, frozen, local, key, cfg.seq_len, s, mesh)


def local_rows(x: np.ndarray) -> np.ndarray:
  """This process's share of a global batch's rows (all of them on one host)."""
  return np.array_split(x, jax.process_count())[jax.process_index()]


class RealReplay:
  def __init__(self, rows, c, mesh):
    self.mesh = mesh
    self.batches = chat_data.Batches(dict(tokens=rows), c.replay.batch_size, c.seed + 7919)

  def next(self, step: int):
    b = self.batches.batch(step, jax.process_index(), jax.process_count())["tokens"]
    return sharding.put_batch(b, self.mesh)
