"""Where replay batches come from (none, real data, self-generated samples) and what is trained.

A source's `next(step)` returns (replay rows [B, T], teacher logits [B, T, V] or None) for that step as global
arrays on the mesh; the teacher logits (the frozen model's, kept from sampling) come only from self-generated
replay with `replay.teacher` resolving to 'sampled', and `sampled_teacher` says so before the first step.
Both are pure functions of the step (self-generated replay refills a buffer from the frozen model with a key
derived from the refill's number), so a resumed run needs no replay state. Sources take what they read as arguments (the mesh,
the frozen weights, the data), never the trainer's own objects.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxreplay import sharding
from jaxreplay.data import chat as chat_data, loader
from jaxreplay.models import lora
from jaxreplay.replay import self_generated

REAL_SEED_OFFSET = 7919  # real replay rows are shuffled apart from the downstream data


def parameterization(c):
  """(trainable_fn, merge_fn): full finetuning trains the parameters themselves; LoRA trains adapters."""
  if c.lora.rank > 0:
    return lora.parameterization(c.lora, jax.random.key(c.seed + 1))
  return (lambda params: params), None


class RealReplay:
  """Real rows: `batch(step)` -> this process's rows of that step (a pure function of the step)."""
  sampled_teacher = False

  def __init__(self, batch: Callable[[int], np.ndarray], mesh):
    self.batch, self.mesh = batch, mesh

  def next(self, step: int):
    return sharding.put_batch(self.batch(step), self.mesh), None


def make_source(c, mesh, model_cfg, frozen, *, real_rows=None, real_path: str = "",
                real_dataset_id: int = -1, prompt_id: int = -1, weights_dir: str = ""):
  """The replay source a finetuning configuration needs, or None (no frozen model, or a method without rows).

  Real replay reads `real_rows` ([N, T], when given) or the token directory `real_path` (rows prefixed with
  `real_dataset_id`); self-generated replay samples `frozen` from `prompt_id`, its cache fingerprinting
  `weights_dir`."""
  method = c.replay.method if frozen is not None else "none"
  if method in ("none", "kl_downstream"):
    return None
  rows, seed = c.replay.batch_size or c.optim.batch_size, c.seed + REAL_SEED_OFFSET
  pi, pc = jax.process_index(), jax.process_count()
  if c.replay.source == "real" and real_rows is not None:  # a chat run's packed replay text, shuffled per epoch
    batches = chat_data.Batches(dict(tokens=real_rows), rows, seed, pi, pc)
    return RealReplay(lambda step: batches.batch(step)["tokens"], mesh)
  if c.replay.source == "real":  # a token directory (the pretraining data), in its own shuffled order
    data = loader.TrainBatches(real_path, c.model.seq_len, rows, seed, real_dataset_id, pi, pc, prefetch=0)
    return RealReplay(data.batch, mesh)
  return self_generated.SelfGeneratedReplay(c, mesh, model_cfg, frozen, prompt_id, weights_dir)
