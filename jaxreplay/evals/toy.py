"""Toy continual learning (digest §3.2 C): four arithmetic tasks learned one after another.

Every example is 14 tokens, `[task, a1 a2 a3, SEP, b1 b2 b3 | NULL×3, EQ, d1 d2 d3 d4, EOS]`, with 3-digit
operands (leading zeros kept) and a 4-digit answer:

  add       a + b                     (000–999 + 000–999 → 0000–1998)
  reversal  a's digits reversed       (b is NULL×3; left-padded with 0 to 4 digits)
  sort      a's digits ascending      (b is NULL×3; left-padded with 0)
  modadd    (a + b) mod 1000          (left-padded with 0)

The task tokens are ids 0–3, which are also the token directories' dataset ids: the loader writes the
dataset id into the first position of every row, so it writes exactly the task token, and self-generated
replay prompted by a dataset id (`replay.prompt_ids`) is prompted by a task. Vocabulary (19): 0–3 tasks,
4 SEP, 5 EQ, 6 NULL, 7 EOS, 8 pad, 9–18 the digits 0–9.

Accuracy is the exact match of the greedy-decoded answer (4 digits + EOS). Greedy decoding reproduces the
answer exactly when the argmax at each answer position, given the correct earlier answer tokens, is the
correct token (by induction over the positions), so one teacher-forced forward pass computes it; a test checks
it against the KV-cache sampler at temperature 0.

`train.run` adds the accuracy on every task as an evaluator (`acc_<task>`) whenever the training data is a
toy task directory (its meta.json names the sibling task directories). The whole experiment — four
finetuning stages from each previous stage's export, without replay and with NTP replay on samples from the
model at the start of the current task, prompted by every earlier task's token — is `sweeps/toy_continual.py`:

  jaxreplay sweep sweeps/toy_continual.py[:cpu|:small] --workdir=runs/toy_continual [--jobs=2]
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay.io import atomic_dir
from jaxreplay.models import decoder

TASKS = ("add", "reversal", "sort", "modadd")
SEP, EQ, NULL, EOS, PAD = 4, 5, 6, 7, 8
DIGIT0 = 9
VOCAB_SIZE = 19
SEQ_LEN = 14
PROMPT_LEN = 9  # task, a×3, SEP, b×3 / NULL×3, EQ
ANSWER = slice(PROMPT_LEN, SEQ_LEN)  # 4 digits + EOS
TOKENIZER_HASH = hashlib.sha256(b"jaxreplay toy v1: tasks 0-3, SEP 4, EQ 5, NULL 6, EOS 7, pad 8, digits 9-18"
                                ).hexdigest()


def _digits(x: np.ndarray, n: int) -> np.ndarray:
  """Base-10 digits of each x, most significant first: [len(x), n]."""
  powers = 10 ** np.arange(n - 1, -1, -1)
  return (x[:, None] // powers) % 10


def answer_digits(task: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The 4 answer digits of each example: [N, 4]."""
  if task == "add":
    return _digits(a + b, 4)
  if task == "modadd":
    return _digits((a + b) % 1000, 4)
  da = _digits(a, 3)
  if task == "reversal":
    out = da[:, ::-1]
  elif task == "sort":
    out = np.sort(da, axis=1)
  else:
    raise ValueError(f"unknown toy task {task!r}: use one of {', '.join(TASKS)}")
  return np.concatenate([np.zeros((len(a), 1), out.dtype), out], axis=1)


def examples(task: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """n random examples of a task as int32 [n, 14]."""
  a = rng.integers(0, 1000, n)
  b = rng.integers(0, 1000, n)
  out = np.empty((n, SEQ_LEN), np.int32)
  out[:, 9:13] = DIGIT0 + answer_digits(task, a, b)  # first: it rejects an unknown task
  out[:, 0] = TASKS.index(task)
  out[:, 1:4] = DIGIT0 + _digits(a, 3)
  out[:, 4] = SEP
  out[:, 5:8] = DIGIT0 + _digits(b, 3) if task in ("add", "modadd") else NULL
  out[:, 8] = EQ
  out[:, 13] = EOS
  return out


def write_task_dir(path: str, task: str, train_examples: int = 65_536, valid_examples: int = 4_096,
                   seed: int = 0) -> str:
  """A token directory of one task: concatenated 14-token examples (train and valid drawn independently).

  Rows of seq_len 14 cut from it are exactly the examples. Written to a temporary directory and renamed, so
  an interrupted write never leaves a directory that looks complete.
  """
  rng = np.random.default_rng([seed, TASKS.index(task)])
  train, valid = examples(task, train_examples, rng), examples(task, valid_examples, rng)
  meta = dict(vocab_size=VOCAB_SIZE, dtype="uint16", tokenizer_hash=TOKENIZER_HASH, dataset_id=TASKS.index(task),
              name=f"toy-{task}", train_tokens=int(train.size), valid_tokens=int(valid.size), eos_id=EOS,
              sources=[], valid_documents={}, toy=_settings(task, train_examples, valid_examples, seed))
  with atomic_dir(path) as tmp:
    train.astype(np.uint16).tofile(os.path.join(tmp, "train.bin"))
    valid.astype(np.uint16).tofile(os.path.join(tmp, "valid.bin"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
  return path


def _settings(task: str, train_examples: int, valid_examples: int, seed: int) -> dict:
  """meta.json's `toy` entry: what made the directory (`build` keeps a directory made with the same)."""
  return dict(task=task, tasks=list(TASKS), seed=seed, train_examples=train_examples, valid_examples=valid_examples)


def build(root: str, train_examples: int = 65_536, valid_examples: int = 4_096, seed: int = 0) -> dict:
  """The four task directories under root (root/add, ...); existing ones with the same settings are kept."""
  out = {}
  for task in TASKS:
    path = os.path.join(root, task)
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        if json.load(f).get("toy") == _settings(task, train_examples, valid_examples, seed):
          out[task] = path
          continue
    os.makedirs(root, exist_ok=True)
    out[task] = write_task_dir(path, task, train_examples, valid_examples, seed)
  return out


# ----------------------------------------------------------------------------------------------- accuracy

def exact_match(logits_BTV, tokens_BT):
  """[B] bool: greedy decoding from the prompt reproduces the answer (4 digits + EOS) exactly."""
  pred_BA = jnp.argmax(logits_BTV[:, PROMPT_LEN - 1:SEQ_LEN - 1], axis=-1)
  return jnp.all(pred_BA == tokens_BT[:, ANSWER], axis=-1)


class AccuracyEvaluator:
  """params -> {acc_<task>: exact-match accuracy} over the given validation examples of each task."""

  def __init__(self, model_cfg, valid: dict, batch_size: int = 512):
    self.valid = {t: np.asarray(v, np.int32) for t, v in valid.items()}
    self.batch_size = max(1, min(batch_size, max(len(v) for v in self.valid.values())))
    self._matches = jax.jit(lambda params, tokens: exact_match(decoder.logits(model_cfg, params, tokens), tokens))

  def __call__(self, params) -> dict:
    out = {}
    for task, rows in self.valid.items():
      hits = 0
      for i in range(0, len(rows), self.batch_size):
        chunk = rows[i:i + self.batch_size]
        n = len(chunk)
        if n < self.batch_size:  # one compiled shape: pad with copies, count only the real rows
          chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.batch_size - n, axis=0)])
        hits += int(np.asarray(jax.device_get(self._matches(params, chunk)))[:n].sum())
      out[f"acc_{task}"] = hits / max(1, len(rows))
    return out


def evaluator_for(c, data_meta: dict, data_path: str, model_cfg):
  """The accuracy evaluator for a run on a toy task directory, or None for any other data.

  Evaluates every task whose directory sits next to the run's (the tasks not yet trained too, as the paper's
  plot does), on min(all, eval.tokens / 14) validation examples of each.
  """
  toy = data_meta.get("toy")
  if not toy:
    return None
  root = os.path.dirname(os.path.abspath(data_path))
  n = max(1, int(c.eval.tokens) // SEQ_LEN)
  valid = {}
  for task in toy["tasks"]:
    path = os.path.join(root, task, "valid.bin")
    if os.path.exists(path):
      valid[task] = np.fromfile(path, np.uint16).reshape(-1, SEQ_LEN)[:n]
  return AccuracyEvaluator(model_cfg, valid, batch_size=int(c.eval.batch_size))
