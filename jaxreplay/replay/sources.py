"""Where replay batches come from (none, real pretraining data, self-generated samples) and what is trained.

A source's `next(step)` returns (replay rows [B, T], teacher logits [B, T, V] or None) for that step as global
arrays on the mesh; the teacher logits (the frozen model's, kept from sampling) come only from self-generated
replay with `replay.teacher` resolving to 'sampled', and `sampled_teacher` says so before the first step.
Real replay is a pure function of the step; self-generated replay refills a buffer from the frozen model and
its position travels in the checkpoint through `state()`.
"""

from __future__ import annotations

import jax

from jaxreplay import sharding
from jaxreplay.data import loader


def replay_batch_size(c) -> int:
  return c.replay.batch_size or c.optim.batch_size


def parameterization(c, frozen):
  """(trainable_fn, merge_fn): full finetuning trains the parameters themselves; LoRA trains adapters."""
  if c.lora.rank > 0:
    from jaxreplay.models import lora
    return lora.parameterization(c.lora, jax.random.key(c.seed + 1))
  return (lambda params: params), None


class RealReplay:
  """Rows of the pretraining data, in their own shuffled order (seeded apart from the downstream data)."""
  sampled_teacher = False

  def __init__(self, c, stage, path: str, dataset_id: int):
    self.mesh = stage.mesh
    self.batches = loader.TrainBatches(path, c.model.seq_len, replay_batch_size(c), c.seed + 7919, dataset_id,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       prefetch=0)

  def next(self, step: int):
    return sharding.put_batch(self.batches.batch(step), self.mesh), None

  def state(self) -> dict:
    return {}


def make_source(c, stage, frozen, state: dict | None):
  """The replay source a finetuning configuration needs, or None."""
  method = c.replay.method if stage.prev is not None else "none"
  if method in ("none", "kl_downstream"):
    return None
  if c.replay.source == "real":
    path = c.replay.path or stage.prev_data_path
    return RealReplay(c, stage, path, stage.prev_dataset_id)
  from jaxreplay.replay import self_generated as replay_self  # self-generated replay: sampling from the frozen model
  return replay_self.SelfGeneratedReplay(c, stage, frozen, state)
