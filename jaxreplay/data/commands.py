"""`jaxreplay data ...`: make tokenizers and token directories, and the default English/Spanish pair.

  jaxreplay data default   [--cache_dir=DIR] [--vocab_size=4096] [--source=auto|debian|shared]
  jaxreplay data tokenizer --out=tokenizer.json [--vocab_size=4096] [--mode=lines] INPUT...
  jaxreplay data tokenize  --tokenizer=tokenizer.json --out=DIR --dataset_id=0 [--valid_fraction=0.05] INPUT...

An INPUT is a text file (plain, .xz, .gz, .bz2), `bible-en` / `bible-es`, or `hf:PATH[:NAME[:SPLIT]]`
(a Hugging Face dataset such as hf:allenai/c4:en, or a local .jsonl file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Iterable, Iterator

from jaxreplay.config import NUM_RESERVED_IDS
from jaxreplay.errors import DataError
from jaxreplay import io
from jaxreplay.io import file_lock

from . import corpora

from .tokenfile import META_FILE, every_kth, read_meta, write_token_dir
from .tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_hash, train_tokenizer

LINES_PER_GROUP = 100  # line-per-document files: validation takes whole blocks of consecutive lines
CACHE_HINT = "pass --cache_dir=DIR, or set $XDG_CACHE_HOME (or $JAXREPLAY_CACHE) to a directory you can write"


def cache_dir_default() -> str:
  """$JAXREPLAY_CACHE, else $XDG_CACHE_HOME/jaxreplay, else ~/.cache/jaxreplay (the XDG default)."""
  if os.environ.get("JAXREPLAY_CACHE"):
    return os.environ["JAXREPLAY_CACHE"]
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "jaxreplay")


def writable_cache_dir(cache_dir: str | None) -> str:
  """The cache directory, created; a home or disk that cannot be written is one sentence, not a trace."""
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or cache_dir_default()))
  try:
    os.makedirs(cache_dir, exist_ok=True)
    if not os.access(cache_dir, os.W_OK):
      raise PermissionError(13, "Permission denied", cache_dir)
  except OSError as e:
    raise DataError(f"The data cache {cache_dir} cannot be written ({e.strerror}): {CACHE_HINT}.") from None
  return cache_dir


def documents(inputs: list[str], mode: str = "lines", limit: int | None = None) -> tuple[Iterable, list[str], int]:
  """(documents, source descriptions, documents per validation group) for a list of inputs."""
  if not inputs:
    raise DataError("No input given: name text files, bible-en / bible-es, or hf:DATASET.")
  parts, sources, group = [], [], LINES_PER_GROUP if mode == "lines" else 1
  for inp in inputs:
    if inp.startswith("bible-"):
      debs = os.path.join(writable_cache_dir(None), "debs")
      books, source = corpora.bible_books(inp.split("-", 1)[1], debs)
      parts.append(corpora.bible_documents(books))
      sources.append(source)
      group = 1
    elif inp.startswith("hf:"):
      path, name, split = (inp[3:].split(":") + [None, "train"])[:3]
      parts.append(corpora.hf_documents(path, name or None, split=split or "train", limit=limit))
      sources.append(inp)
      group = 1
    else:
      if not os.path.isfile(inp):
        raise DataError(f"Input {inp} is neither a file nor a corpus name: use a text file, bible-en, bible-es "
                        "or hf:DATASET[:NAME[:SPLIT]].")
      parts.append(corpora.read_text_files([inp], mode))
      sources.append(f"file:{os.path.abspath(inp)}")
  docs = itertools.chain.from_iterable(map(not_empty, parts, inputs))
  return (itertools.islice(docs, limit) if limit else docs), sources, group


def not_empty(docs: Iterable, inp: str) -> Iterator:
  """The documents of one input; an input with none would add no tokens, which is a mistake, not a corpus."""
  n = 0
  for n, doc in enumerate(docs, 1):
    yield doc
  if n == 0:
    raise DataError(f"Input {inp} holds no text (it is empty or only whitespace), so it yields no tokens: "
                    "fix the path or leave it out of the inputs.")


def cmd_tokenizer(inputs: list[str], out: str, vocab_size: int = 4096, mode: str = "lines",
                  limit: int | None = None) -> str:
  """Trains a byte-level BPE on the inputs and writes it to `out`; returns its hash."""
  docs, _, _ = documents(inputs, mode, limit=limit)
  train_tokenizer((d[1] if isinstance(d, tuple) else d for d in docs), vocab_size, out)  # (name, text) or text
  return tokenizer_hash(out)


def cmd_tokenize(inputs: list[str], tokenizer: str, out_dir: str, dataset_id: int, valid_fraction: float = 0.05,
                 mode: str = "lines", name: str = "", limit: int | None = None, progress: bool = True) -> dict:
  """Tokenizes the inputs into a token directory; whole documents (or line blocks) go to validation."""
  if not 0 <= dataset_id < NUM_RESERVED_IDS:
    raise DataError(f"dataset_id={dataset_id} must be one of the reserved ids 0–{NUM_RESERVED_IDS - 1}.")
  load_tokenizer(tokenizer)  # a bad tokenizer fails before any corpus is fetched
  docs, sources, group = documents(inputs, mode, limit=limit)
  return write_token_dir(out_dir, docs, tokenizer, dataset_id=dataset_id, name=name, sources=sources,
                         is_valid=every_kth(valid_fraction, group), progress=progress)


def _built(root: str) -> dict | None:
  tok = os.path.join(root, TOKENIZER_FILE)
  dirs = {lang: os.path.join(root, lang) for lang in corpora.BIBLES}
  if not os.path.isfile(tok) or not all(os.path.isfile(os.path.join(d, META_FILE)) for d in dirs.values()):
    return None
  h = tokenizer_hash(tok)
  return dirs if all(read_meta(d)["tokenizer_hash"] == h for d in dirs.values()) else None


def build_default_corpora(cache_dir: str | None = None, vocab_size: int = 4096, source: str = "auto",
                          valid_fraction: float = 0.05, progress: bool = False) -> dict:
  """English (dataset id 0) and Spanish (id 1) Bible token dirs sharing one tokenizer trained on both.

  Cached under cache_dir/bible_v{vocab_size}; a second call returns at once. Whole books are held out for
  validation, the same books in both languages. Says on stderr what it fetches and where, when it builds.
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or cache_dir_default()))
  root = os.path.join(cache_dir, f"bible_v{vocab_size}")
  done = _built(root)
  if done:
    return done
  cache_dir = writable_cache_dir(cache_dir)
  with file_lock(os.path.join(cache_dir, ".bible.lock")):  # parallel runs of a sweep may all ask for it
    done = _built(root)
    if done:
      return done
    packages = " and ".join(spec["package"] for spec in corpora.BIBLES.values())
    print(f"jaxreplay: building the default English/Spanish data once, in {root}: downloading the Debian "
          f"packages {packages} with `apt-get download` (nothing is installed), else reading the shared text; "
          f"to cache elsewhere, {CACHE_HINT}.", file=sys.stderr, flush=True)
    books = {lang: corpora.bible_books(lang, os.path.join(cache_dir, "debs"), source) for lang in corpora.BIBLES}
    tok = os.path.join(root, TOKENIZER_FILE)
    verses = (v for lang in corpora.BIBLES for _, vs in books[lang][0] for v in vs if v)
    train_tokenizer(verses, vocab_size, tok)
    out = {}
    for dataset_id, lang in enumerate(corpora.BIBLES):
      out[lang] = os.path.join(root, lang)
      write_token_dir(out[lang], corpora.bible_documents(books[lang][0]), tok, dataset_id=dataset_id,
                      name=f"bible-{lang}", sources=[books[lang][1]], is_valid=every_kth(valid_fraction),
                      progress=progress)
    return out


def resolve_path(path: str, cache_dir: str | None = None) -> str:
  """A data path from a config: a token directory, or `default:en` / `default:es[:VOCAB]` (the Bible pair,
  built into `cache_dir` (default `cache_dir_default()`) on first use). Returns an absolute directory path."""
  if not path:
    raise DataError("config.data.path is empty: set it to a token directory made by `jaxreplay data tokenize` "
                    "(or default:en / default:es).")
  if path.startswith("default:"):
    parts = path.split(":")
    if len(parts) not in (2, 3) or parts[1] not in corpora.BIBLES or (len(parts) == 3 and not parts[2].isdigit()):
      raise DataError(f"Data path {path!r} is not of the form default:LANG[:VOCAB_SIZE] with LANG in "
                      f"{', '.join(corpora.BIBLES)}: e.g. default:en or default:es:4096.")
    vocab = int(parts[2]) if len(parts) == 3 else 4096
    return build_default_corpora(cache_dir, vocab_size=vocab)[parts[1]]
  return io.abspath(os.path.expanduser(path))  # a URL (gs://...) as given


def main(argv: list[str]) -> int:
  """Entry point for `jaxreplay data`; argv[0] is the program name. A user's mistake raises DataError."""
  p = argparse.ArgumentParser(prog=argv[0] if argv else "jaxreplay data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  d = sub.add_parser("default", help="the English/Spanish Bible pair (dataset ids 0 and 1)")
  d.add_argument("--cache_dir", default=None, help="default: $JAXREPLAY_CACHE, $XDG_CACHE_HOME/jaxreplay or "
                 "~/.cache/jaxreplay")
  d.add_argument("--vocab_size", type=int, default=4096)
  d.add_argument("--source", default="auto", choices=("auto", "debian", "shared"))
  t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
  t.add_argument("inputs", nargs="+")
  t.add_argument("--out", required=True)
  t.add_argument("--vocab_size", type=int, default=4096)
  for q in (t, sub.add_parser("tokenize", help="tokenize text into a token directory")):
    q.add_argument("--mode", default="lines", choices=corpora.TEXT_MODES)
    q.add_argument("--limit", type=int, default=None, help="at most this many documents")
  k = sub.choices["tokenize"]
  k.add_argument("inputs", nargs="+")
  k.add_argument("--tokenizer", required=True)
  k.add_argument("--out", required=True)
  k.add_argument("--dataset_id", type=int, required=True)
  k.add_argument("--valid_fraction", type=float, default=0.05)
  k.add_argument("--name", default="")
  a = p.parse_args(argv[1:])
  if a.command == "default":
    result = build_default_corpora(a.cache_dir, a.vocab_size, a.source, progress=True)
  elif a.command == "tokenizer":
    result = dict(tokenizer=a.out, hash=cmd_tokenizer(a.inputs, a.out, a.vocab_size, a.mode, a.limit))
  else:
    result = cmd_tokenize(a.inputs, a.tokenizer, a.out, a.dataset_id, a.valid_fraction, a.mode, a.name, a.limit)
  print(tokenize_summary(a.out, result) if a.command == "tokenize" else json.dumps(result, indent=2))
  return 0


def tokenize_summary(out_dir: str, meta: dict) -> str:
  """Three lines: what was written where, and the validation split (its document ids stay in meta.json)."""
  total = meta["train_tokens"] + meta["valid_tokens"]
  valid = meta["valid_documents"]["count"]
  share = meta["valid_tokens"] / total if total else 0.0
  path = os.path.abspath(out_dir)
  return (f"wrote {path}: {total:,} tokens in {meta['documents']:,} documents "
          f"(dataset id {meta['dataset_id']}, vocabulary {meta['vocab_size']:,})\n"
          f"train: {meta['train_tokens']:,} tokens; validation: {meta['valid_tokens']:,} tokens ({share:.1%}) "
          f"in {valid:,} documents\n"
          f"details (sources, validation document ids): {os.path.join(path, META_FILE)}")
