"""What one training stage reads, resolved from its config before the first step: the mesh, the model (the
paper's, or a Hugging Face checkpoint's), the training data (a token directory, or chat JSON lines with loss
masks and packed segments), the evaluation sets, the replay inputs and the run's length.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from jaxreplay import config as config_lib, rundir, sharding
from jaxreplay.io import write_json
from jaxreplay.data import chat as chat_data, loader, tokenfile
from jaxreplay.models import decoder, export as export_lib, hf_import
from jaxreplay.replay import self_generated


def total_steps(c: ml_collections.ConfigDict, params: Callable[[], int], tokens_per_epoch: int | None) -> int | None:
  """The run's length in steps from its stop section (params(): the count stop.tokens_per_param multiplies, asked
  only then; tokens_per_epoch: the data's, None when unknown); None when nothing bounds the length."""
  s = c.stop
  if s.steps:
    return int(s.steps)
  if s.tokens:
    tokens = s.tokens
  elif s.tokens_per_param:
    tokens = s.tokens_per_param * params()
  elif s.epochs and tokens_per_epoch is not None:
    tokens = s.epochs * tokens_per_epoch
  else:
    return None
  return max(1, int(round(tokens / config_lib.tokens_per_step(c))))


class Stage:
  """Everything one run reads, from a config that `experiments/resolve.run_config` validated and resolved.

  `weights_dir`: where the frozen model π_pre comes from (init.from's workdir, model.path's directory, or ''
  for pretraining); `eval_sets`: name -> a re-iterable of this process's eval batches."""

  def __init__(self, c, workdir: str):
    self.c, self.workdir = c, workdir
    self.mesh = sharding.make_mesh(c.mesh)
    self.prev = None  # the pretraining run a finetuning run starts from
    self.tokenizer = self.hf_dir = None
    self.real_rows = self.real_probe = None
    self.prompt_id, self.real_path, self.real_dataset_id = -1, "", -1
    B, div = c.optim.batch_size, sharding.batch_divisor(self.mesh) * c.train.microbatches
    if B % div:
      raise config_lib.ConfigError(f"config.optim.batch_size={B} is not divisible by the {div} data-parallel "
                                   "devices × train.microbatches: choose a multiple of mesh.data × mesh.fsdp.")
    if c.model.path:
      self._hf_model()
      self._chat_data()
    else:
      self._paper_model()
      self._token_data()
    self.weights_dir = self.hf_dir or c.init["from"]
    self.counts = decoder.param_counts(self.model_cfg)
    self.tokens_per_step = config_lib.tokens_per_step(c)
    self.total_steps = total_steps(c, lambda: self.counts[c.model.param_count], self.tokens_per_epoch)
    every = c.eval.every_steps or round(c.eval.every_tokens / self.tokens_per_step)
    self.eval_every = max(1, int(every))

  # --------------------------------------------------------------------------------------------- the model

  def _paper_model(self):
    c = self.c
    dtype = config_lib.compute_dtype_name(c, jax.default_backend())
    self.model_cfg = decoder.ModelConfig.from_config(c.model, dtype, jax.default_backend())
    if c.init["from"]:
      self.prev = ml_collections.ConfigDict(export_lib.exported_config(c.init["from"]))

  def _hf_model(self):
    c, platform = self.c, jax.default_backend()
    self.hf_dir = hf_import.resolve(c.model.path)
    hf = hf_import.read_config(self.hf_dir)
    unroll = c.model.scan_unroll or (hf["num_hidden_layers"] if platform == "cpu" else 1)
    self.model_cfg = hf_import.config_from_hf(hf, c.model.seq_len, config_lib.compute_dtype_name(c, platform),
                                              c.model.remat, unroll)
    self.tokenizer = chat_data.load_tokenizer(self.hf_dir)
    if len(self.tokenizer) > self.model_cfg.vocab_size:
      raise config_lib.ConfigError(f"The tokenizer in {self.hf_dir} has {len(self.tokenizer)} tokens but the model "
                                   f"only {self.model_cfg.vocab_size}: use the checkpoint's own tokenizer.")
    pad, bos = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
    self.pad_id = pad if pad is not None else max(self.model_cfg.pad_id, 0)
    self.prompt_id = bos if bos is not None else self.model_cfg.bos_id  # self-generated replay: BOS alone
    if c.replay.method != "none" and c.replay.source == "self" and self.prompt_id < 0:
      raise config_lib.ConfigError("Self-generated replay starts from the BOS token, but this checkpoint's "
                                   "config.json names no bos_token_id: use replay.source='real'.")

  # ---------------------------------------------------------------------------------------------- the data

  def _token_data(self):
    c, M, T, B = self.c, self.c.model, self.c.model.seq_len, self.c.optim.batch_size
    # Downstream data must share the pretrained model's tokenizer.
    prev_hash = tokenfile.read_meta(self.prev.data.path)["tokenizer_hash"] if self.prev is not None else None
    self.data_meta = tokenfile.open_token_dir(c.data.path, M.vocab_size, T, tokenizer_hash=prev_hash).meta
    self.dataset_id = c.data.dataset_id if c.data.dataset_id >= 0 else int(self.data_meta["dataset_id"])
    mix = None
    if c.data.mix_fraction:
      mix_dir = tokenfile.open_token_dir(c.data.mix_path, M.vocab_size, T)
      mix = (c.data.mix_path, c.data.mix_fraction, int(mix_dir.meta["dataset_id"]))
    self.batches = loader.TrainBatches(c.data.path, T, B, c.seed, self.dataset_id, jax.process_index(),
                                       jax.process_count(), mix=mix, prefetch=c.data.prefetch)
    self.tokens_per_epoch = self.batches.tokens_per_epoch
    self.eval_sets = {"valid": self._eval_set(c.data.path, self.dataset_id)}
    if mix is not None:
      self.eval_sets["mix"] = self._eval_set(mix[0], mix[2])
    if self.prev is not None:
      prev = self.prev.data
      self.real_path = c.replay.path or prev.path
      self.real_dataset_id = (prev.dataset_id if prev.dataset_id >= 0 else  # the pretraining data's id
                              int(tokenfile.open_token_dir(prev.path, M.vocab_size, T).meta["dataset_id"]))
      self.eval_sets["prev"] = self._eval_set(prev.path, self.real_dataset_id)
      if c.replay.method != "none" and c.replay.source == "self":
        self.prompt_id = self_generated.paper_prompt_id(c, self.real_dataset_id)

  def _eval_set(self, path, dataset_id):
    c = self.c
    return loader.eval_batches(path, "valid", c.model.seq_len, c.eval.batch_size, c.eval.tokens, dataset_id,
                               process_index=jax.process_index(), process_count=jax.process_count())

  def _chat_data(self):
    c, T = self.c, self.c.model.seq_len
    write = jax.process_index() == 0
    self.train, self.valid = chat_data.load_splits(c, self.tokenizer, self.hf_dir, self.pad_id, write)
    arrays = dict(tokens=self.train.tokens, mask=self.train.mask, segments=self.train.segments)
    self.batches = chat_data.Batches(arrays, c.optim.batch_size, c.seed, jax.process_index(), jax.process_count())
    self.tokens_per_epoch = len(self.train) * T
    self.data_meta, self.dataset_id = {}, -1
    self.eval_sets = {"valid": self._chat_eval_set()} if self.valid is not None else {}
    r = c.replay
    if r.path and (r.source == "real" and r.method != "none" or c.eval.replay_rows):
      eos = self.model_cfg.eos_ids[0] if self.model_cfg.eos_ids else None  # Llama-3: <|end_of_text|>
      self.real_rows, self.real_probe = chat_data.load_replay_text(c, self.tokenizer, self.hf_dir, self.prompt_id,
                                                                   eos, write)
    div = sharding.batch_divisor(self.mesh)
    m = 0 if self.real_probe is None else len(self.real_probe) // div * div
    if m:  # held-out real replay text: the forgetting probe real_ntp / real_kl
      self.eval_sets["real"] = [sharding.local_rows(self.real_probe[:m])]

  def _chat_eval_set(self) -> list[dict]:
    """eval.valid_rows held-out chat rows (0: all) in batches of eval.batch_size, the last one padded with
    rows whose mask is off."""
    c, valid, div = self.c, self.valid, sharding.batch_divisor(self.mesh)
    EB = -(-c.eval.batch_size // div) * div
    n = min(len(valid), c.eval.valid_rows or len(valid))
    n_pad = -(-n // EB) * EB
    idx = np.arange(n_pad) % len(valid)
    weight = (np.arange(n_pad) < n)[:, None]
    rows = dict(tokens=valid.tokens[idx], mask=valid.mask[idx] & weight, segments=valid.segments[idx])
    return [{k: sharding.local_rows(v[i:i + EB]) for k, v in rows.items()} for i in range(0, n_pad, EB)]

  def write_data_stats(self):
    """What chat packing made of the data, as data_stats.json (process 0; nothing for token data)."""
    if self.c.model.path and jax.process_index() == 0:
      write_json(os.path.join(self.workdir, rundir.DATA_STATS), dict(
          train=self.train.stats, valid=self.valid.stats if self.valid is not None else None,
          total_steps=self.total_steps, replay_rows=None if self.real_rows is None else len(self.real_rows)))

