"""Byte-level BPE tokenizer with the paper's reserved ids.

Ids 0–9 are reserved for dataset-id tokens (the first token of every training row, and the prompt of
self-generated replay), id 10 is the end-of-document token appended to every document. Byte-level BPE
means every string round-trips exactly, whatever its alphabet.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxreplay.io import write_text
from jaxreplay.config import NUM_RESERVED_IDS
from jaxreplay.errors import DataError

RESERVED_TOKENS = tuple(f"<resv_{i}>" for i in range(NUM_RESERVED_IDS))
EOS_TOKEN = "</s>"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(text_iter: Iterable[str], vocab_size: int = 4096, out_path: str | None = None) -> Tokenizer:
  """Trains on an iterator of documents (streamed, so a large corpus is never held in memory)."""
  min_size = NUM_RESERVED_IDS + 1 + 256
  if vocab_size < min_size:
    raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE: use at least {min_size} "
                    f"({NUM_RESERVED_IDS} reserved ids + EOS + 256 bytes).")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      special_tokens=[*RESERVED_TOKENS, EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(batched(text_iter, 1000), trainer=trainer)
  _check_special_ids(tok, "the trained tokenizer")
  tok.encode_special_tokens = True  # a literal "</s>" in the text is text, not EOS
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_text(out_path, tok.to_str(pretty=True))  # the bytes tok.save writes
  return tok


def batched(items: Iterable, n: int) -> Iterator[list]:
  """Lists of n consecutive items (the last one shorter), as Python 3.12's itertools.batched."""
  it = iter(items)
  while batch := list(itertools.islice(it, n)):
    yield batch


def tokenizer_file(path: str) -> str:
  """Accepts the json file itself or a directory holding tokenizer.json (a token dir, a run dir)."""
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise DataError(f"Tokenizer file {path} does not exist: train one with `jaxreplay data tokenizer` "
                    "or point at a token directory that holds tokenizer.json.")
  return path


def load_tokenizer(path: str) -> Tokenizer:
  path = tokenizer_file(path)
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # the Rust error says little; name the file instead
    raise DataError(f"Tokenizer file {path} is not a valid tokenizers JSON file ({e}): "
                    "retrain it with `jaxreplay data tokenizer`.") from None
  _check_special_ids(tok, path)
  tok.encode_special_tokens = True
  return tok


def tokenizer_hash(path: str) -> str:
  """sha256 of the json file: token files and runs record it so mismatched tokenizers are caught."""
  with open(tokenizer_file(path), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def eos_id(tok: Tokenizer) -> int:
  i = tok.token_to_id(EOS_TOKEN)
  if i is None:
    raise DataError(f"The tokenizer has no {EOS_TOKEN} token: retrain it with `jaxreplay data tokenizer`.")
  return i


def _check_special_ids(tok: Tokenizer, where: str):
  for want, token in enumerate([*RESERVED_TOKENS, EOS_TOKEN]):
    got = tok.token_to_id(token)
    if got != want:
      raise DataError(f"{where} maps {token} to id {got}, not {want}: train tokenizers with "
                      "`jaxreplay data tokenizer` so that ids 0–9 are reserved and 10 is EOS.")
