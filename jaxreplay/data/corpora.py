"""Where text comes from: local files, the embedded Bible pair, and Hugging Face streaming datasets.

Every reader yields documents (a string, or a (name, text) pair when documents have names) one at a time,
so a corpus of any size streams into `write_token_dir` without being held in memory.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import itertools
import lzma
import os
import shutil
import subprocess
import tempfile
from typing import Iterable, Iterator

from jaxreplay.errors import DataError

from .sword import find_module, read_zText
from .versification import BOOKS, chapters

TEXT_MODES = ("lines", "paragraphs", "file")


# ---------------------------------------------------------------- local text files

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def open_text(path: str) -> io.TextIOBase:
  """Opens plain, .xz, .gz or .bz2 text as strict UTF-8 (read it inside `utf8_errors(path)`)."""
  if not os.path.isfile(path):
    raise DataError(f"Text file {path} does not exist: check the input path.")
  return _OPENERS.get(os.path.splitext(path)[1], open)(path, "rt", encoding="utf-8")


@contextlib.contextmanager
def utf8_errors(path: str):
  """Turns a UnicodeDecodeError while reading `path` into one sentence naming the file and the byte offset."""
  try:
    yield
  except UnicodeDecodeError:
    offset, bad = first_non_utf8(path)
    where = "of the decompressed text " if os.path.splitext(path)[1] in _OPENERS else ""
    raise DataError(f"{path} is not UTF-8 text: byte offset {offset} {where}holds {bad.hex(' ')}, which is no "
                    "UTF-8 character; convert the file to UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`).") from None


def first_non_utf8(path: str, chunk: int = 1 << 20) -> tuple[int, bytes]:
  """(offset, bytes) of the first invalid UTF-8 sequence of a (decompressed) file; only read after an error."""
  decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
  with _OPENERS.get(os.path.splitext(path)[1], open)(path, "rb") as f:
    while True:
      data = f.read(chunk)
      pending = decoder.getstate()[0]  # bytes of a character split across reads, decoded with this chunk
      try:
        decoder.decode(data, final=not data)
      except UnicodeDecodeError as e:
        return done - len(pending) + e.start, e.object[e.start:e.end]
      if not data:
        return done, b""  # not reached for a file that failed to decode
      done += len(data)


def read_text_files(paths: Iterable[str], mode: str = "lines") -> Iterator[str]:
  """Documents from text files: one per non-empty line, per blank-line-separated paragraph, or per file."""
  if mode not in TEXT_MODES:
    raise DataError(f"mode={mode!r} is unknown: use one of {', '.join(TEXT_MODES)}.")
  for path in paths:
    with open_text(path) as f, utf8_errors(path):
      if mode == "file":
        text = f.read().strip()
        yield from [text] if text else []
        continue
      lines = (line.rstrip("\n") for line in f)
      if mode == "lines":
        yield from (line for line in lines if line.strip())
        continue
      for filled, para in itertools.groupby(lines, key=lambda line: bool(line.strip())):
        if filled:
          yield "\n".join(para)


# ---------------------------------------------------------------- the Bible pair

BIBLES = {
    "en": dict(package="sword-text-kjv", shared="en_bible_kjv.txt.xz", title="King James Version (1769)"),
    "es": dict(package="sword-text-sparv", shared="es_bible_rv1909.txt.xz", title="Reina-Valera 1909"),
}
# Verse slots (0-based, KJV order) that the Reina-Valera module leaves empty (their text sits in a
# neighbouring verse); the shared one-verse-per-line copy omits them, so they are put back to find books.
EMPTY_VERSES = {"es": (4075, 4648, 7839, 8580, 11933, 13736, 13832, 13833, 13834, 13884, 13885, 13886, 13887,
                       13888, 22252, 22548, 27626, 29057), "en": ()}
NUM_VERSES = 31102


def shared_corpora_dir() -> str | None:
  """The project's ready-made corpora (../shared/data/corpora), or $JAXREPLAY_CORPORA."""
  candidates = [os.environ.get("JAXREPLAY_CORPORA", "")]
  here = os.path.dirname(os.path.abspath(__file__))
  for base in (os.getcwd(), os.path.join(here, "..", "..")):
    candidates.append(os.path.join(base, "..", "shared", "data", "corpora"))
  for c in candidates:
    if c and os.path.isdir(c):
      return os.path.normpath(c)
  return None


def download_deb(package: str, cache_dir: str, timeout: float = 300) -> str:
  """Extracts a Debian package into cache_dir/package with `apt-get download` + `dpkg-deb -x`.

  Nothing is installed. Runs `apt-get update` once (as root only) when apt does not know the package.
  Returns the extracted tree; raises DataError when the registry or the tools are unavailable.
  """
  root = os.path.join(cache_dir, package)
  if os.path.isfile(os.path.join(root, ".complete")):
    return root
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise DataError(f"`{tool}` is not available, so the Debian package {package} cannot be fetched: "
                      "run on Debian/Ubuntu or use the ready-made text in shared/data/corpora.")
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    def apt(*args):  # fail fast when the registry is unreachable instead of retrying for minutes
      return subprocess.run(["apt-get", "-o", "Acquire::Retries=0", "-o", "Acquire::http::Timeout=20", *args],
                            cwd=tmp, capture_output=True, text=True, timeout=timeout)
    try:
      r = apt("download", package)
      if r.returncode and hasattr(os, "geteuid") and os.geteuid() == 0 and "Unable to locate" in r.stderr:
        apt("update")  # a fresh machine has no package lists yet
        r = apt("download", package)
    except subprocess.TimeoutExpired:
      raise DataError(f"`apt-get download {package}` took longer than {timeout:.0f} s: check the network "
                      "to the Debian registry.") from None
    debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
    if r.returncode or len(debs) != 1:
      msg = (r.stderr.strip().splitlines() or ["no output"])[-1]
      raise DataError(f"`apt-get download {package}` failed ({msg}): check access to the Debian registry.")
    extracted = os.path.join(tmp, "x")
    subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), extracted], check=True, timeout=timeout)
    open(os.path.join(extracted, ".complete"), "w").close()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(extracted, root)
  return root


def bible_books(lang: str, cache_dir: str, source: str = "auto") -> tuple[list[tuple[str, list[str]]], str]:
  """The Bible in `lang` ('en' KJV, 'es' Reina-Valera 1909) as [(book, verses)] in KJV versification.

  source 'debian' reads the SWORD module from Debian's package; 'shared' the project's ready-made text;
  'auto' tries Debian first and falls back to the shared text. Returns (books, a description of the source).
  """
  if lang not in BIBLES:
    raise DataError(f"Bible language {lang!r} is unknown: use one of {', '.join(BIBLES)}.")
  spec = BIBLES[lang]
  if source not in ("auto", "debian", "shared"):
    raise DataError(f"source={source!r} is unknown: use 'auto', 'debian' or 'shared'.")
  if source in ("auto", "debian"):
    try:
      root = download_deb(spec["package"], cache_dir)
      return read_zText(find_module(root)), f"deb:{spec['package']}"
    except DataError:
      if source == "debian":
        raise
  shared = shared_corpora_dir()
  path = os.path.join(shared, spec["shared"]) if shared else None
  if not path or not os.path.isfile(path):
    raise DataError(f"Neither the Debian package {spec['package']} nor the shared text {spec['shared']} is "
                    "available: allow access to the Debian registry or set $JAXREPLAY_CORPORA to "
                    "shared/data/corpora.")
  with open_text(path) as f, utf8_errors(path):
    lines = [line.rstrip("\n") for line in f]
  return split_verses_into_books(lines, EMPTY_VERSES[lang], path), f"file:{spec['shared']}"


def split_verses_into_books(lines: list[str], empty: Iterable[int] = (), where: str = "text"
                            ) -> list[tuple[str, list[str]]]:
  """Groups one-verse-per-line text (KJV order, `empty` verse slots omitted) into books."""
  empty = sorted(empty)
  if len(lines) + len(empty) != NUM_VERSES:
    raise DataError(f"{where} has {len(lines)} verse lines, not the {NUM_VERSES - len(empty)} expected: "
                    "use the unmodified shared Bible text.")
  verses = list(lines)
  for i in empty:
    verses.insert(i, "")
  books, i = [], 0
  for b, (_, name, _) in enumerate(BOOKS):
    n = sum(chapters(b))
    books.append((name, verses[i:i + n]))
    i += n
  return books


def bible_documents(books: list[tuple[str, list[str]]]) -> Iterator[tuple[str, str]]:
  """One document per book: its non-empty verses, one per line."""
  for name, verses in books:
    yield name, "\n".join(v for v in verses if v)


# ---------------------------------------------------------------- Hugging Face datasets

def hf_documents(path: str, name: str | None = None, split: str = "train", limit: int | None = None
                 ) -> Iterator[str]:
  """The `text` field of records streamed from a Hugging Face dataset (e.g. path='allenai/c4', name='en').

  A local .json/.jsonl/.parquet/.txt path is read with the matching builder, so the same code runs offline.
  Needs the optional `datasets` package (pip install 'jaxreplay[hf]').
  """
  try:
    import datasets  # lazy: the optional `hf` extra
  except ImportError:
    raise DataError("Reading Hugging Face datasets needs the `datasets` package: "
                    "pip install 'jaxreplay[hf]'.") from None
  builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
  ext, files = os.path.splitext(path)[1], None
  if os.path.isfile(path) and ext in builder:
    path, files = builder[ext], path
  try:
    ds = datasets.load_dataset(path, name, split=split, streaming=True, data_files=files)
  except Exception as e:  # network, unknown dataset, bad config: one sentence with the cause
    raise DataError(f"Could not open Hugging Face dataset {path!r} (name={name!r}, split={split!r}): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  yield from texts_from_records(ds, limit=limit, where=path)


def texts_from_records(records: Iterable[dict], text_field: str = "text", limit: int | None = None,
                       where: str = "dataset") -> Iterator[str]:
  """The text field of each record (empty ones skipped), up to `limit` documents."""
  n = 0
  for rec in records:
    if limit is not None and n >= limit:
      return
    if text_field not in rec:
      raise DataError(f"Records of {where} have no field {text_field!r} (fields: {', '.join(rec)}): "
                      "set the text field.")
    text = rec[text_field]
    if text and text.strip():
      n += 1
      yield text
