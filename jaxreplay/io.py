"""Atomic writes: a reader (or a crash) sees the old file or the new one, never a torn one.

Each write goes to a tmp name beside the target that no other writer shares (`NAME.tmp.<pid>.<random>`, in
the same directory so `os.replace` is a rename on one filesystem), is flushed and fsynced, and then replaces
the target. Two writers at once each replace the target whole; the last one wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid

from jaxreplay import rundir


def tmp_name(path: str) -> str:
  """A name beside `path` that no other writer, in this process or another, uses at the same time."""
  return f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", fsync: bool = True):
  """`with atomic_open(p) as f: f.write(...)`: `p` appears (whole) when the block ends, and not on an error."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}.")
  tmp = tmp_name(path)
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str):
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, obj, indent: int | None = 2, **dumps_kwargs):
  """`obj` as JSON (dumped before the file is opened, so a value json cannot write leaves nothing behind)."""
  write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs))


@contextlib.contextmanager
def atomic_dir(path: str):
  """`with atomic_dir(p) as tmp: ...write files into tmp...`: then `tmp` replaces the directory `p` whole.

  An interrupted build leaves only a tmp directory (never a `p` that looks complete); a `p` already there is
  removed just before the rename.
  """
  tmp = tmp_name(path.rstrip("/"))
  os.makedirs(tmp)
  try:
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def file_lock(path: str):
  """Holds an exclusive lock on the file `path` (created) for the block: concurrent runs of a sweep wait."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (none when it does not exist yet)."""
  path = os.path.join(workdir, rundir.METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
