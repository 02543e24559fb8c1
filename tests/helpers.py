"""Shared test fixtures: tiny learnable token directories and tiny configs."""

import json
import os
import re

import jax
import numpy as np

from jaxreplay import config as config_lib
from jaxreplay.data import tokenfile


def markov_tokens(n: int, vocab_size: int, seed: int, step: int = 3) -> np.ndarray:
  """A stream a small model learns fast: mostly next = prev·step + 1 (mod V), sometimes a random token."""
  rng = np.random.default_rng(seed)
  out = np.empty(n, np.int64)
  out[0] = 11
  jumps = rng.random(n) < 0.1
  rand = rng.integers(11, vocab_size, n)
  for i in range(1, n):
    out[i] = rand[i] if jumps[i] else 11 + (out[i - 1] * step + 1) % (vocab_size - 11)
  return out


def token_dir(path, vocab_size=64, train_tokens=20_000, valid_tokens=4_000, dataset_id=0, seed=0, step=3):
  """A token directory with the metadata the loader checks."""
  os.makedirs(path, exist_ok=True)
  dtype = tokenfile.dtype_for(vocab_size)
  tokens = markov_tokens(train_tokens + valid_tokens, vocab_size, seed, step)
  tokens[:train_tokens].astype(dtype).tofile(os.path.join(path, "train.bin"))
  tokens[train_tokens:].astype(dtype).tofile(os.path.join(path, "valid.bin"))
  meta = dict(vocab_size=vocab_size, dtype=np.dtype(dtype).name, tokenizer_hash="0" * 64, dataset_id=dataset_id,
              name=os.path.basename(str(path)), train_tokens=train_tokens, valid_tokens=valid_tokens, sources=[],
              valid_documents={}, eos_id=10)
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:  # runs copy it; its content is not read here
    json.dump({"model": {"type": "stand-in"}}, f)
  return str(path)


def tiny_config(data_path, **stop):
  """A model that trains a step in milliseconds on one CPU core."""
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=16, vocab_size=64)
  c.data.path = str(data_path)
  c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=256)
  c.eval.update(every_tokens=128 * 10, tokens=1024, batch_size=8)
  c.checkpoint.update(every_steps=10, every_minutes=0.0, async_save=False)
  c.log.update(every_steps=5, progress=False)
  c.stop.update(**(stop or dict(steps=30)))
  return c


def two_datasets(root) -> dict:
  """Two learnable token directories: 'a' (dataset id 0, pretraining) and 'b' (dataset id 1, finetuning)."""
  return dict(a=token_dir(root / "a", dataset_id=0, seed=0, step=3),
              b=token_dir(root / "b", dataset_id=1, seed=1, step=5))


def dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
  """The element types of both operands of every matrix product in the lowered (StableHLO) program of `fn`:
  what the compiler is asked to multiply in, whatever the outputs are cast to afterwards."""
  text = jax.jit(fn).lower(*args).as_text()
  out = []
  for line in text.splitlines():
    if "stablehlo.dot_general" in line:
      m = re.search(r":\s*\(tensor<(?:\d+x)*(\w+)>,\s*tensor<(?:\d+x)*(\w+)>\)", line)
      assert m, line
      out.append((m.group(1), m.group(2)))
  return out
