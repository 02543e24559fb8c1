"""Chat-format finetuning data: prompt/response JSON lines → the tokenizer's chat template → packed rows.

Each example is rendered with the tokenizer's own chat template and tokenized piece by piece at the turn
boundaries: the text up to each assistant turn (with the generation prompt, exactly what the model sees when
it answers) and the assistant turn itself (its text and end-of-turn token). The loss mask is True on the
assistant pieces only. Examples are packed greedily into rows of T tokens without splitting one across
rows; each carries its own segment id (1, 2, ...; 0 = padding), so attention stays within an example and
positions restart at 0 in each (see `models/decoder.py`). Data order is a pure function of the step.

Also the text source of *real* replay: plain documents ({"text": ...} lines), each BOS + text + EOS, packed
contiguously and cut into T-token rows, as pretraining data is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle

import numpy as np

from jaxreplay.errors import ChatDataError
from jaxreplay.io import atomic_open


def load_tokenizer(directory: str):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(directory)
  if not getattr(tok, "chat_template", None):
    raise ChatDataError(f"The tokenizer in {directory} has no chat_template: use an instruct model's tokenizer "
                        "(its tokenizer_config.json carries the template).")
  return tok


def json_lines(path: str, error: type[Exception], expected: str):
  """(line number, object) for each non-blank line of a JSON-lines file; a missing file or a line that is not a
  JSON object raises `error` naming the file, the line and `expected` (what each line should hold)."""
  if not os.path.exists(path):
    raise error(f"{path!r} does not exist: give a JSON-lines file of {expected}.")
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{n} is not valid JSON ({e.msg}): write one JSON object ({expected}) per line.") from None
      if not isinstance(row, dict):
        raise error(f"{path}:{n} is not a JSON object: write one object ({expected}) per line.")
      yield n, row


def read_jsonl(path: str, prompt_key: str = "prompt", response_key: str = "response",
               prompt_template: str = "{prompt}", system: str = "") -> list[list[dict]]:
  """Conversations (lists of {role, content}) from JSON lines with prompt/response fields or a `messages` list."""
  out = []
  for n, row in json_lines(path, ChatDataError, f"{{{prompt_key!r}, {response_key!r}}} or {{'messages'}} objects"):
    if "messages" in row:
      msgs = list(row["messages"])
    elif prompt_key in row and response_key in row:
      msgs = [dict(role="user", content=prompt_template.format(prompt=row[prompt_key])),
              dict(role="assistant", content=row[response_key])]
    else:
      raise ChatDataError(f"{path}:{n} has neither {prompt_key!r}+{response_key!r} nor 'messages': fix the line "
                          "or set the data's prompt_key/response_key.")
    if system and msgs[0].get("role") != "system":
      msgs.insert(0, dict(role="system", content=system))
    out.append(msgs)
  if not out:
    raise ChatDataError(f"Chat data file {path!r} holds no examples.")
  return out


def _render(tokenizer, messages, generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
  """(token ids, mask) of a rendered conversation; mask True exactly on the assistant turns' tokens."""
  pieces, prev = [], ""
  for j, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = _render(tokenizer, messages[:j], True)
    upto = _render(tokenizer, messages[:j + 1], False)
    if not before.startswith(prev) or not upto.startswith(before):
      raise ChatDataError("The tokenizer's chat template does not render conversations as growing prefixes (turn "
                          f"{j}): masks cannot be placed; use a template without per-turn rewriting.")
    pieces += [(before[len(prev):], False), (upto[len(before):], True)]
    prev = upto
  if not pieces:
    raise ChatDataError("A conversation has no assistant turn: every example needs a response to train on.")
  ids, mask = [], []
  for text, is_assistant in pieces:
    piece = _ids(tokenizer, text)
    ids += piece
    mask += [is_assistant] * len(piece)
  return ids, mask


def encode_prompt_completion(tokenizer, messages: list[dict], completion: str) -> tuple[list[int], int]:
  """(ids, start): the prompt rendered up to the assistant's turn, then `completion`; ids[start:] is the completion."""
  prompt = _ids(tokenizer, _render(tokenizer, messages, True))
  return prompt + _ids(tokenizer, completion), len(prompt)


@dataclasses.dataclass
class Packed:
  tokens: np.ndarray  # [N, T] int32
  mask: np.ndarray  # [N, T] bool: the token is a training target
  segments: np.ndarray  # [N, T] int32: example id within the row, 0 = padding
  stats: dict

  def __len__(self):
    return self.tokens.shape[0]


def pack(encoded, seq_len: int, pad_id: int, long: str = "truncate") -> Packed:
  """Greedy packing in order: an example goes into the current row if it fits, else starts a new one."""
  if long not in ("truncate", "drop"):
    raise ChatDataError(f"long={long!r}: use 'truncate' or 'drop' for examples longer than seq_len.")
  rows, row = [], []
  truncated = dropped = 0
  for ids, mask in encoded:
    if len(ids) > seq_len:
      if long == "drop":
        dropped += 1
        continue
      ids, mask = ids[:seq_len], mask[:seq_len]
      truncated += 1
    if sum(len(x[0]) for x in row) + len(ids) > seq_len:
      rows.append(row)
      row = []
    row.append((ids, mask))
  if row:
    rows.append(row)
  if not rows:
    raise ChatDataError(f"No example fits in seq_len={seq_len} (all {dropped} dropped): raise seq_len or use "
                        "long='truncate'.")
  N = len(rows)
  tokens = np.full((N, seq_len), pad_id, np.int32)
  masks = np.zeros((N, seq_len), bool)
  segments = np.zeros((N, seq_len), np.int32)
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row, 1):
      tokens[r, at:at + len(ids)] = ids
      masks[r, at:at + len(ids)] = mask
      segments[r, at:at + len(ids)] = s
      at += len(ids)
  stats = dict(rows=N, examples=sum(len(r) for r in rows), truncated=truncated, dropped=dropped,
               target_tokens=int(masks.sum()), fill=float((segments > 0).mean()))
  return Packed(tokens, masks, segments, stats)


def pack_documents(token_lists, seq_len: int) -> np.ndarray:
  """Documents concatenated and cut into [N, T] rows (the remainder is dropped), as pretraining data."""
  flat = np.fromiter((t for doc in token_lists for t in doc), np.int32)
  n = len(flat) // seq_len
  if n == 0:
    raise ChatDataError(f"The replay text holds {len(flat)} tokens, fewer than one row of seq_len={seq_len}.")
  return flat[:n * seq_len].reshape(n, seq_len)


def read_text_jsonl(path: str, tokenizer, text_key: str = "text", limit_tokens: int = 0,
                    bos_id: int | None = None, eos_id: int | None = None) -> list[list[int]]:
  """Documents of a {"text": ...} JSON-lines file as BOS + text + EOS token lists.

  bos_id/eos_id default to the tokenizer's; an instruct tokenizer's EOS is often its end-of-turn token, so
  callers pass the model's end-of-text id (the first of config.json's eos_token_id) instead."""
  bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
  eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
  bos = [bos_id] if bos_id is not None and bos_id >= 0 else []
  eos = [eos_id] if eos_id is not None and eos_id >= 0 else []
  docs, total = [], 0
  for n, row in json_lines(path, ChatDataError, f"objects with a {text_key!r} field"):
    if text_key not in row:
      raise ChatDataError(f"{path}:{n} is not a JSON object with a {text_key!r} field.")
    docs.append(bos + _ids(tokenizer, row[text_key]) + eos)
    total += len(docs[-1])
    if limit_tokens and total >= limit_tokens:
      break
  return docs


class Batches:
  """Rows of a [N, ...] array set in a per-epoch shuffled order; batch(step) is a pure function of the step."""

  def __init__(self, arrays: dict, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    self.arrays, self.process = arrays, (process_index, process_count)
    self.n = len(next(iter(arrays.values())))
    self.batch_size, self.seed = batch_size, seed
    self._perms = {}

  def _perm(self, epoch: int):
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    i = step * self.batch_size + np.arange(self.batch_size)
    return np.array([self._perm(e)[w] for e, w in zip(i // self.n, i % self.n)])

  def batch(self, step: int) -> dict:
    """This process's rows of step `step`."""
    pi, pc = self.process
    idx = np.array_split(self.indices(step), pc)[pi]
    return {k: v[idx] for k, v in self.arrays.items()}

  def iterate(self, start: int = 0):
    """(step, this process's rows of that step's batch) from `start` on, as `loader.TrainBatches.iterate`."""
    step = start
    while True:
      yield step, self.batch(step)
      step += 1


# ---------------------------------------------------------------------------------------- a run's chat data

def split_examples(d, seed: int) -> tuple[list, list]:
  """(train, valid) message lists from the config's `data` section: data.valid, or valid_fraction held out."""
  read = lambda p: read_jsonl(p, d.prompt_key, d.response_key, d.prompt_template, d.system)
  train = read(d.train)
  if d.valid:
    return train, read(d.valid)
  n_valid = int(round(d.valid_fraction * len(train)))
  if n_valid == 0:
    return train, []
  order = np.random.default_rng([seed, 1]).permutation(len(train))
  return [train[i] for i in order[n_valid:]], [train[i] for i in order[:n_valid]]


def cached(cache_dir: str, kind: str, key: list, model_dir: str, build, write: bool = True):
  """Tokenized data, built once and shared by every run of a sweep (tokenizing 600K chats takes minutes).

  Kept in cache_dir (empty: beside the first file named in `key`) under a hash of the inputs: file paths,
  sizes and modification times, the tokenizer files in model_dir and the settings in `key`. `write`: whether
  this process stores what it built (process 0 of a multi-host run)."""
  stamp = []
  for path in [x for x in key if isinstance(x, str) and os.path.isfile(x)] + sorted(
      os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.startswith(("tokenizer", "special_tokens"))):
    st = os.stat(path)
    stamp.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
  digest = hashlib.sha256(repr((kind, key, stamp)).encode()).hexdigest()[:16]
  source = next(x for x in key if isinstance(x, str) and x)
  directory = cache_dir or os.path.dirname(os.path.abspath(source))
  path = os.path.join(directory, f".jaxreplay-{kind}-{digest}.pkl")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return pickle.load(f)
  value = build()
  if write:
    try:  # a temporary name of its own: two jobs of a sweep may build the same cache at once
      with atomic_open(path, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:
      pass  # a read-only data directory: tokenize again next time
  return value


def load_splits(c, tokenizer, model_dir: str, pad_id: int, write: bool = True) -> tuple[Packed, Packed | None]:
  """The packed (train, valid) chat rows of a config (data.kind='chat'), through the token cache."""
  d, T = c.data, c.model.seq_len

  def build():
    train_ex, valid_ex = split_examples(d, c.seed)
    enc = lambda exs: [encode_chat(tokenizer, m) for m in exs]
    valid = pack(enc(valid_ex), T, pad_id, d.long) if valid_ex else None
    return pack(enc(train_ex), T, pad_id, d.long), valid

  key = [d.train, d.valid, d.valid_fraction, d.prompt_key, d.response_key, d.prompt_template, d.system, d.long, T,
         c.seed]
  return cached(d.cache_dir, "chat", key, model_dir, build, write)


def load_replay_text(c, tokenizer, model_dir: str, bos_id: int, eos_id, write: bool = True):
  """(training rows [N, T], held-out probe rows or None) of real replay text (config.replay.path): the last
  eval.replay_rows rows (at most half) are the forgetting probe; training replay never sees them."""
  r, T = c.replay, c.model.seq_len
  build = lambda: pack_documents(read_text_jsonl(r.path, tokenizer, r.text_key, r.max_tokens, bos_id, eos_id), T)
  rows = cached(c.data.cache_dir, "text", [r.path, r.text_key, r.max_tokens, T], model_dir, build, write)
  n_probe = min(c.eval.replay_rows, len(rows) // 2)
  return rows[:len(rows) - n_probe], (rows[len(rows) - n_probe:] if n_probe else None)
