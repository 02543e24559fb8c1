"""Token directories: flat token files plus the metadata that makes a mismatch detectable.

A token directory holds `train.bin` and `valid.bin` (documents, each followed by EOS, packed end to end as
uint16, or uint32 when the vocabulary exceeds 65,535), `meta.json` and a copy of the `tokenizer.json` that
made them. The loader memory-maps the files, so a corpus of any size costs no memory; `open_token_dir`
checks everything a run depends on before the first step, so a bad file fails at once with one sentence.

A token directory may be a URL (gs://...). Each host then reads it through a local copy that it downloads once
into its cache ($JAXREPLAY_CACHE, else $XDG_CACHE_HOME/jaxreplay, else ~/.cache/jaxreplay), keyed by the URL and
its meta.json: ranged GETs per batch reached 0.3–0.5 M tokens/s even from a loopback server (256 random rows a
batch), below the loader's 0.5 M floor, while the memory-mapped copy gives ~400 M. `write_token_dir` to a URL
builds the directory locally and uploads it, meta.json last (a reader takes meta.json to mean complete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from jaxreplay.errors import DataError
from jaxreplay import io
from jaxreplay.io import atomic_dir

from .tokenizer import TOKENIZER_FILE, batched, eos_id, load_tokenizer, tokenizer_file, tokenizer_hash

META_FILE = "meta.json"
SPLITS = ("train", "valid")
META_KEYS = ("vocab_size", "dtype", "tokenizer_hash", "dataset_id", "train_tokens", "valid_tokens", "eos_id")
_CHECK_CHUNK = 1 << 24  # tokens per vectorized id check (32 MiB of uint16)


def dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def every_kth(valid_fraction: float, group: int = 1) -> Callable[[int], bool]:
  """Validation predicate: every k-th group of `group` consecutive documents (k = 1 / valid_fraction).

  Grouping keeps neighbouring paragraphs of one source together, so validation text is not a near copy
  of training text.
  """
  if valid_fraction <= 0:
    return lambda i: False
  if not 0 < valid_fraction < 1:
    raise DataError(f"valid_fraction={valid_fraction} must lie in (0, 1), e.g. 0.05.")
  k = max(2, round(1 / valid_fraction))
  return lambda i: (i // group) % k == k - 1


def write_token_dir(out_dir: str, documents: Iterable, tokenizer_path: str, *, dataset_id: int, name: str = "",
                    sources: list | None = None, is_valid: Callable[[int], bool] | None = None,
                    chunk_docs: int = 512, progress: bool = True) -> dict:
  """Tokenizes documents into a new token directory and returns its metadata.

  `documents` yields strings or (name, text) pairs, is consumed once, chunk by chunk: each chunk is encoded
  in parallel by the Rust tokenizer and appended to the split its index falls in (`is_valid(i)`), so
  memory stays bounded by one chunk. Writing goes to a temporary directory renamed at the end, so an
  interrupted run never leaves a directory that looks complete.
  """
  if io.is_url(out_dir):
    with tempfile.TemporaryDirectory(prefix="jaxreplay-tokens-") as tmp:
      local = os.path.join(tmp, os.path.basename(out_dir.rstrip("/")))
      meta = write_token_dir(local, documents, tokenizer_path, dataset_id=dataset_id, name=name, sources=sources,
                             is_valid=is_valid, chunk_docs=chunk_docs, progress=progress)
      io.rmtree(out_dir)
      io.upload_dir(local, out_dir, last=META_FILE)
    return meta
  tok = load_tokenizer(tokenizer_path)
  vocab = tok.get_vocab_size()
  eos, dtype = eos_id(tok), dtype_for(vocab)
  is_valid = is_valid or (lambda i: False)
  with atomic_dir(out_dir) as tmp:
    counts = dict(train=0, valid=0)
    valid_docs, valid_names, n_docs = 0, [], 0
    with contextlib.ExitStack() as stack:
      files = {s: stack.enter_context(open(os.path.join(tmp, f"{s}.bin"), "wb")) for s in SPLITS}
      bar = stack.enter_context(tqdm(unit="doc", desc=f"tokenize {name or out_dir}", disable=not progress))
      for chunk in batched(documents, chunk_docs):
        texts, splits = [], []
        for doc in chunk:
          doc_name, text = doc if isinstance(doc, tuple) else (None, doc)
          splits.append("valid" if is_valid(n_docs) else "train")
          if splits[-1] == "valid":
            valid_docs += 1
            if len(valid_names) < 1000:  # enough to see which documents; bounded for huge corpora
              valid_names.append(doc_name if doc_name is not None else n_docs)
          texts.append(text)
          n_docs += 1
        encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
        for split in SPLITS:
          flat = [t for e, s in zip(encoded, splits) if s == split for t in (*e.ids, eos)]
          if flat:
            np.array(flat, dtype=dtype).tofile(files[split])
            counts[split] += len(flat)
        bar.update(len(chunk))
    shutil.copyfile(tokenizer_file(tokenizer_path), os.path.join(tmp, TOKENIZER_FILE))
    meta = dict(vocab_size=vocab, dtype=dtype.name, tokenizer_hash=tokenizer_hash(tokenizer_path),
                dataset_id=int(dataset_id), name=name or os.path.basename(out_dir.rstrip("/")),
                train_tokens=counts["train"], valid_tokens=counts["valid"], documents=n_docs,
                sources=list(sources or []), eos_id=eos,
                valid_documents=dict(count=valid_docs, names=valid_names))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  return meta


@dataclasses.dataclass
class TokenDir:
  """An opened, validated token directory; `train`/`valid` are read-only memory maps."""
  path: str
  meta: dict
  train: np.ndarray
  valid: np.ndarray

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise DataError(f"split={name!r} is unknown: use 'train' or 'valid'.")
    return getattr(self, name)


def local_copy(url: str, cache_root: str | None = None) -> str:
  """This host's copy of the token directory at `url`, downloaded once (again when its meta.json changes)."""
  read_meta(url)  # a missing or unfinished directory: one sentence before any download
  meta_bytes = io.read_bytes(io.join(url, META_FILE))
  key = hashlib.sha256(url.rstrip("/").encode() + b"\0" + meta_bytes).hexdigest()[:20]
  local = os.path.join(cache_root or io.host_cache_dir(), "remote_tokens", key)
  if os.path.isfile(os.path.join(local, META_FILE)):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with atomic_dir(local) as tmp:  # several processes of one host may download at once: each renames a whole copy
    for name in io.listdir(url):
      if name != META_FILE:
        io.copy_to_local(io.join(url, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, META_FILE), "wb") as f:
      f.write(meta_bytes)
  return local


def read_meta(path: str) -> dict:
  meta_path = io.join(path, META_FILE)
  if not io.isdir(path):
    raise DataError(f"Token directory {path} does not exist: create it with `jaxreplay data tokenize` "
                    "or fix config.data.path.")
  if not io.exists(meta_path):
    raise DataError(f"{meta_path} is missing, so {path} is not a finished token directory: "
                    "(re)create it with `jaxreplay data tokenize`.")
  try:
    meta = io.read_json(meta_path)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{meta_path} is not valid JSON ({e}): recreate the directory with `jaxreplay data tokenize`.")
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise DataError(f"{meta_path} lacks {', '.join(missing)}: recreate the directory with `jaxreplay data tokenize`.")
  return meta


def open_token_dir(path: str, vocab_size: int | None = None, seq_len: int = 1,
                   tokenizer_hash: str | None = None) -> TokenDir:
  """Opens and validates a token directory for a model with `vocab_size` and rows of `seq_len` tokens.

  vocab_size None takes the metadata's (for tools that only read). Raises DataError for a missing or
  incomplete directory, a file whose size does not fit its dtype, a tokenizer other than the run's,
  a vocabulary larger than the model's, ids outside it, or a training split shorter than one row.
  """
  if io.is_url(path):
    td = open_token_dir(local_copy(path), vocab_size, seq_len, tokenizer_hash)
    return dataclasses.replace(td, path=path)
  meta = read_meta(path)
  meta_path = os.path.join(path, META_FILE)
  if vocab_size is not None and meta["vocab_size"] > vocab_size:
    raise DataError(f"{path} was tokenized with a vocabulary of {meta['vocab_size']}, larger than "
                    f"config.model.vocab_size={vocab_size}: set config.model.vocab_size={meta['vocab_size']} "
                    "or retokenize with a smaller tokenizer.")
  if tokenizer_hash is not None and meta["tokenizer_hash"] != tokenizer_hash:
    raise DataError(f"{path} was made with tokenizer {meta['tokenizer_hash'][:12]}…, not the run's "
                    f"{tokenizer_hash[:12]}…: retokenize it with the run's tokenizer.json "
                    "(`jaxreplay data tokenize --tokenizer=...`).")
  if meta["dtype"] not in ("uint16", "uint32"):
    raise DataError(f"{meta_path} names dtype {meta['dtype']!r}: token files must be uint16 or uint32; "
                    "recreate the directory with `jaxreplay data tokenize`.")
  dtype, limit = np.dtype(meta["dtype"]), vocab_size if vocab_size is not None else meta["vocab_size"]
  arrays = {split: _open_split(path, split, dtype, meta[f"{split}_tokens"], limit) for split in SPLITS}
  if arrays["train"].size < seq_len:
    raise DataError(f"{os.path.join(path, 'train.bin')} holds {arrays['train'].size} tokens, fewer than one "
                    f"sequence of seq_len={seq_len}: tokenize more text or lower config.model.seq_len.")
  return TokenDir(path=path, meta=meta, train=arrays["train"], valid=arrays["valid"])


def _open_split(path: str, split: str, dtype: np.dtype, expected: int, vocab_size: int) -> np.ndarray:
  file = os.path.join(path, f"{split}.bin")
  if not os.path.isfile(file):
    raise DataError(f"{file} is missing: recreate {path} with `jaxreplay data tokenize`.")
  size = os.path.getsize(file)
  if size % dtype.itemsize or size // dtype.itemsize != expected:
    raise DataError(f"{file} has {size} bytes, but meta.json promises {expected} {dtype.name} tokens "
                    f"({expected * dtype.itemsize} bytes): the file is truncated or of another dtype; "
                    "recreate the directory with `jaxreplay data tokenize`.")
  if size == 0:
    return np.zeros((0,), dtype)
  arr = np.memmap(file, dtype=dtype, mode="r")
  for start in range(0, arr.size, _CHECK_CHUNK):
    top = int(arr[start:start + _CHECK_CHUNK].max())
    if top >= vocab_size:
      at = start + int(np.argmax(arr[start:start + _CHECK_CHUNK] >= vocab_size))
      raise DataError(f"{file} holds token id {top} (first bad id at position {at}), outside "
                      f"vocab_size={vocab_size}: set config.model.vocab_size above it or retokenize "
                      "with the run's tokenizer.")
  return arr
