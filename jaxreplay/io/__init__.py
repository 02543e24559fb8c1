"""Files and objects: atomic writes, and every path a URL may take (gs://, or any etils.epath/fsspec scheme).

A local write goes to a tmp name beside the target that no other writer shares (`NAME.tmp.<pid>.<random>`, in
the same directory so `os.replace` is a rename on one filesystem), is flushed and fsynced, and then replaces
the target. Two writers at once each replace the target whole; the last one wins. An object store needs none
of that: one upload is one object, which readers see whole or not at all, so a URL write is buffered in memory
and uploaded once when the block ends without an error.

Appends (metrics.jsonl) on an object store rewrite the object from the writer's copy (`Appender`): the object
stays one valid file that every reader, and `gsutil cat`, reads as is, and a metrics file is small (KBs to a few
MB), so the rewrite costs less than teaching every reader to merge chunks. `Appender` rate-limits the rewrites.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob as glob_lib
import io as _io
import json
import os
import shutil
import time
import uuid

from etils import epath

from jaxreplay.errors import StorageError

GCS_EXTRA = "pip install 'jaxreplay[gcs]' (or pip install gcsfs)"


# ---------------------------------------------------------------------------------------------- URLs

def is_url(path) -> bool:
  return "://" in str(path)


def _require_gcsfs(path: str):
  if str(path).startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  (fsspec loads it by name for gs://)
    except ImportError:
      raise StorageError(f"{path} is a gs:// path, which needs gcsfs: {GCS_EXTRA}.") from None


def collapsed_url(path: str) -> str | None:
  """The URL a local path was made from by collapsing its `//` (os.path.abspath('gs://b') → '/cwd/gs:/b')."""
  for scheme in ("gs:", "s3:", "az:", "hf:"):
    at = str(path).find(f"{scheme}/")
    if at >= 0 and (at == 0 or str(path)[at - 1] == "/") and not str(path).startswith(f"{scheme}//"):
      return f"{scheme}//{str(path)[at + len(scheme) + 1:]}"
  return None


def path(p) -> epath.Path:
  """An etils.epath.Path for a local path or a URL; one sentence when it cannot work here."""
  p = str(p)
  if not is_url(p) and collapsed_url(p):
    raise StorageError(f"{p} looks like the URL {collapsed_url(p)} with its '//' collapsed into a local path: "
                       "give the URL itself (gs://bucket/...), or a local path without 'gs:/'.")
  _require_gcsfs(p)
  return epath.Path(p)


def join(base, *parts) -> str:
  return str(path(base).joinpath(*parts)) if is_url(base) else os.path.join(str(base), *parts)


def abspath(p) -> str:
  """os.path.abspath for local paths; a URL is already absolute (abspath would mangle its '//')."""
  return str(p).rstrip("/") if is_url(p) else os.path.abspath(str(path(p)))


def host_cache_dir() -> str:
  """This host's cache: $JAXREPLAY_CACHE, else $XDG_CACHE_HOME/jaxreplay, else ~/.cache/jaxreplay."""
  if os.environ.get("JAXREPLAY_CACHE"):
    return os.environ["JAXREPLAY_CACHE"]
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "jaxreplay")


def _bucket(p: str) -> str:
  return str(p).split("://", 1)[0] + "://" + str(p).split("://", 1)[1].split("/", 1)[0]


def check_same_storage(**named) -> None:
  """All of these paths on one storage: local ones together, or URLs in one bucket (a run never spans two)."""
  given = {k: str(v) for k, v in named.items() if v}
  for k, v in given.items():
    path(v)  # a collapsed URL, or gs:// without gcsfs
  homes = {k: (_bucket(v) if is_url(v) else "local disk") for k, v in given.items()}
  if len(set(homes.values())) > 1:
    listing = ", ".join(f"{k}={given[k]}" for k in given)
    raise StorageError(f"These paths are half local and half remote ({listing}): put them all in one bucket "
                       "(or all on local disk), e.g. give only --workdir and let the rest live under it.")


def check_writable(directory) -> str:
  """Fails early, with one sentence, if `directory` (local or URL) cannot be written; returns it, absolute."""
  directory = abspath(directory)
  probe = join(directory, f".write-probe-{uuid.uuid4().hex[:12]}")
  try:
    if is_url(directory):
      fs, _ = fs_and_path(directory)
      bucket = _bucket(directory).split("://", 1)[1]
      if not fs.exists(bucket):
        raise StorageError(f"The bucket {_bucket(directory)} does not exist (or these credentials cannot see "
                           f"it): create it (gcloud storage buckets create {_bucket(directory)}) or fix the URL.")
    else:
      os.makedirs(directory, exist_ok=True)
    write_text(probe, "")
    remove(probe)
  except StorageError:
    raise
  except Exception as e:  # OSError for disks; gcsfs raises its own HttpError for 401/403
    raise StorageError(f"Cannot write to {directory} ({_one_line(e)}): fix its permissions or the credentials "
                       "(gcloud auth application-default login), or choose another location.") from None
  return directory


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) < 200 else text[:197] + "..."


def fs_and_path(url: str):
  """(fsspec filesystem, path inside it), with no listing cache: other hosts write the same bucket."""
  import fsspec
  _require_gcsfs(url)
  fs, inner = fsspec.core.url_to_fs(str(url), use_listings_cache=False)
  return fs, inner


# ---------------------------------------------------------------------------------------------- reads

def exists(p) -> bool:
  if is_url(p):
    fs, inner = fs_and_path(p)
    return fs.exists(inner)
  return os.path.exists(str(path(p)))


def isdir(p) -> bool:
  if is_url(p):
    fs, inner = fs_and_path(p)
    return fs.isdir(inner)
  return os.path.isdir(str(path(p)))


def listdir(p) -> list[str]:
  """Names (not paths) directly under `p`; [] when there is nothing."""
  if is_url(p):
    fs, inner = fs_and_path(p)
    try:
      return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(inner, detail=False)} - {""})
    except FileNotFoundError:
      return []
  return sorted(os.listdir(p)) if os.path.isdir(p) else []


def glob(pattern: str) -> list[str]:
  """Paths (URLs stay URLs) matching a glob pattern, sorted: e.g. every WORKDIR/runs/**/final.json."""
  if is_url(pattern):
    fs, inner = fs_and_path(pattern)
    scheme = str(pattern).split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in fs.glob(inner))
  return sorted(glob_lib.glob(pattern, recursive=True))


def read_bytes(p) -> bytes:
  if is_url(p):
    fs, inner = fs_and_path(p)
    return fs.cat_file(inner)
  with open(p, "rb") as f:
    return f.read()


def read_text(p) -> str:
  return read_bytes(p).decode("utf-8")


def read_json(p):
  return json.loads(read_text(p))


def size(p) -> int:
  if is_url(p):
    fs, inner = fs_and_path(p)
    return int(fs.size(inner))
  return os.path.getsize(p)


def mtime(p) -> float:
  """Last modification, seconds since the epoch (an object's `updated` time)."""
  if is_url(p):
    fs, inner = fs_and_path(p)
    return fs.modified(inner).timestamp()
  return os.path.getmtime(p)


def read_range(p, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of a file or object (one ranged GET on an object store)."""
  if is_url(p):
    fs, inner = fs_and_path(p)
    return fs.cat_file(inner, start=start, end=stop)
  with open(p, "rb") as f:
    f.seek(start)
    return f.read(stop - start)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (none when it does not exist yet)."""
  p = join(workdir, "metrics.jsonl")  # rundir.METRICS, which builds on this module and so cannot be imported
  if not exists(p):
    return []
  return [json.loads(l) for l in read_text(p).splitlines() if l.strip()]


# ---------------------------------------------------------------------------------------------- writes

def tmp_name(path: str) -> str:
  """A name beside `path` that no other writer, in this process or another, uses at the same time."""
  return f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", fsync: bool = True):
  """`with atomic_open(p) as f: f.write(...)`: `p` appears (whole) when the block ends, and not on an error."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}.")
  if is_url(path):
    buf = _io.StringIO() if mode == "w" else _io.BytesIO()
    yield buf
    data = buf.getvalue()
    fs, inner = fs_and_path(path)
    fs.pipe_file(inner, data.encode("utf-8") if mode == "w" else data)
    return
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


def write_bytes(path: str, data: bytes):
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str):
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, obj, indent: int | None = 2, **dumps_kwargs):
  """`obj` as JSON (dumped before the file is opened, so a value json cannot write leaves nothing behind)."""
  write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs))


def makedirs(p):
  """A local directory (made); on an object store, nothing: prefixes need no creating."""
  if not is_url(p):
    os.makedirs(str(path(p)), exist_ok=True)


def remove(p):
  """Removes a file or object (a missing one is fine)."""
  with contextlib.suppress(FileNotFoundError):
    if is_url(p):
      fs, inner = fs_and_path(p)
      fs.rm_file(inner)
    else:
      os.remove(p)


def rmtree(p):
  """Removes a directory, or every object under a prefix (a missing one is fine)."""
  if is_url(p):
    fs, inner = fs_and_path(p)
    with contextlib.suppress(FileNotFoundError):
      fs.rm(inner, recursive=True)
  else:
    shutil.rmtree(p, ignore_errors=True)


def move(src: str, dst: str):
  """Renames a file or directory; on an object store, copies every object under `src` and then deletes them."""
  if is_url(src):
    fs, inner = fs_and_path(src)
    fs.mv(inner, fs_and_path(dst)[1], recursive=True)
  else:
    os.replace(src, dst)


def copy_to_local(src: str, dst: str):
  """Downloads a file or object to a local path, atomically (a reader never sees half a download)."""
  tmp = tmp_name(dst)
  try:
    if is_url(src):
      fs, inner = fs_and_path(src)
      fs.get_file(inner, tmp)
    else:
      shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def upload_dir(local: str, url: str, last: str | None = None):
  """Uploads the files of a local directory under `url`, the file named `last` after all others (a marker that
  readers take to mean the directory is complete)."""
  names = sorted(os.listdir(local), key=lambda n: n == last)
  for name in names:
    src = os.path.join(local, name)
    if os.path.isdir(src):
      upload_dir(src, join(url, name))
    else:
      fs, inner = fs_and_path(join(url, name))
      fs.put_file(src, inner)


class Appender:
  """Appends text to a file; on an object store, rewrites the object from this copy at most every
  `min_interval_s` seconds (and at `flush`/`close`), so it is always one whole, valid file."""

  def __init__(self, p: str, min_interval_s: float = 10.0):
    self.path, self.min_interval_s = str(p), min_interval_s
    self._remote = is_url(p)
    self._text = read_text(p) if self._remote and exists(p) else ""
    self._dirty, self._last = False, None

  def write(self, text: str):
    if not self._remote:
      with open(self.path, "a") as f:
        f.write(text)
      return
    self._text += text
    self._dirty = True
    if self._last is None or time.monotonic() - self._last >= self.min_interval_s:
      self.flush()

  def flush(self):
    if self._remote and self._dirty:
      write_text(self.path, self._text)
      self._dirty, self._last = False, time.monotonic()

  def close(self):
    self.flush()


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
