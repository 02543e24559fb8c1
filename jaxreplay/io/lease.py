"""Leases: one runner at a time holds a run, on an object store (no flock there) or on a local disk.

A runner claims a run by creating its lease object only if none exists: GCS checks `ifGenerationMatch=0` on a
multipart upload (the request gcsfs makes; the loopback test server, like old fake-gcs-server releases, does not
check it on a simple media upload, so that is never used). The lease names its holder (host, pid) and carries a
heartbeat that the holder rewrites every `ttl_s / 3`; each rewrite is matched to the generation the holder last
wrote, so a holder that lost its lease learns it at its next heartbeat instead of overwriting the new holder's.
A lease whose heartbeat is older than `ttl_s` has expired: another runner replaces it, matched to the generation
it read, so of two runners that take over at once exactly one wins.

On a local disk the same operations use an exclusive create (a hard link of a finished file, so a reader never
sees it half written) and, for replace and delete, a compare-and-swap under flock on a side file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from jaxreplay.errors import StorageError
from jaxreplay.io import fs_and_path, atomic_open, file_lock, is_url, tmp_name


class LeaseHeld(StorageError):
  """The run is held by a live runner; the message says who and since when."""


@dataclasses.dataclass(frozen=True)
class Holder:
  holder: str
  host: str
  pid: int
  since: float
  heartbeat: float
  ttl_s: float

  def expired(self, now: float | None = None) -> bool:
    return (time.time() if now is None else now) > self.heartbeat + self.ttl_s

  def describe(self) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
    return (f"{self.host} (pid {self.pid}) since {when}, last heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s "
            f"ago")


# ---------------------------------------------------------------------------------- compare-and-swap stores

class _GCSStore:
  """One object, written by multipart uploads with generation preconditions (GCS JSON API through gcsfs)."""

  def __init__(self, url: str):
    self.fs, inner = fs_and_path(url)
    self.bucket, self.key = inner.split("/", 1)

  def _upload(self, data: bytes, generation: int) -> int | None:
    meta = json.dumps({"name": self.key, "contentType": "application/json"})
    body = (b"--lease\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" + meta.encode() +
            b"\r\n--lease\r\nContent-Type: application/json\r\n\r\n" + data + b"\r\n--lease--\r\n")
    url = self.fs.base.replace("/storage/v1/", "/upload/storage/v1/") + "b/{}/o"
    try:
      out = self.fs.call("POST", url, self.bucket, uploadType="multipart", ifGenerationMatch=str(generation),
                         headers={"Content-Type": "multipart/related; boundary=lease"}, data=body, json_out=True)
    except FileExistsError:  # gcsfs's name for 412 Precondition Failed
      return None
    return int(out["generation"])

  def create(self, data: bytes) -> int | None:
    return self._upload(data, 0)

  def replace(self, data: bytes, generation: int) -> int | None:
    return self._upload(data, generation)

  def read(self) -> tuple[int, bytes] | None:
    try:
      meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
      _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media",
                             generation=meta["generation"])
    except FileNotFoundError:  # absent, or replaced between the two reads: read again later
      return None
    return int(meta["generation"]), data

  def delete(self, generation: int) -> bool:
    try:
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
      return False
    return True


class _LocalStore:
  """One file: created exclusively; replaced and deleted under flock, checked against a generation inside it."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def _locked(self):
    return file_lock(self.path + ".lock")

  @staticmethod
  def _wrap(data: bytes, generation: int) -> bytes:
    return json.dumps({"generation": generation, "lease": json.loads(data)}).encode()

  def create(self, data: bytes) -> int | None:
    tmp = tmp_name(self.path)
    with open(tmp, "wb") as f:
      f.write(self._wrap(data, 1))
    try:
      os.link(tmp, self.path)  # fails if the lease exists, like O_EXCL, and never shows a half-written file
      return 1
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)

  def read(self) -> tuple[int, bytes] | None:
    try:
      with open(self.path, "rb") as f:
        wrapped = json.loads(f.read())
    except FileNotFoundError:
      return None
    return int(wrapped["generation"]), json.dumps(wrapped["lease"]).encode()

  def replace(self, data: bytes, generation: int) -> int | None:
    with self._locked():
      now = self.read()
      if now is None or now[0] != generation:
        return None
      with atomic_open(self.path, "wb") as f:
        f.write(self._wrap(data, generation + 1))
      return generation + 1

  def delete(self, generation: int) -> bool:
    with self._locked():
      now = self.read()
      if now is None or now[0] != generation:
        return False
      os.remove(self.path)
      return True


def _store(path: str):
  return _GCSStore(path) if is_url(path) else _LocalStore(path)


# ---------------------------------------------------------------------------------- the lease

def read_holder(path: str) -> Holder | None:
  """Who holds the lease at `path` (for --status), or None."""
  got = _store(path).read()
  return None if got is None else Holder(**json.loads(got[1]))


class Lease:
  """`Lease(path, ttl_s).try_acquire()`: True when this runner now holds the run; `heartbeat()` keeps it."""

  def __init__(self, path: str, ttl_s: float = 300.0):
    self.path, self.ttl_s = str(path), float(ttl_s)
    self._store = _store(self.path)
    self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    self.generation: int | None = None
    self.since = 0.0

  def _body(self) -> bytes:
    now = time.time()
    return json.dumps(dataclasses.asdict(Holder(self.holder, socket.gethostname(), os.getpid(), self.since or now,
                                                now, self.ttl_s))).encode()

  def try_acquire(self) -> bool:
    """Claims the run if no live runner holds it (creates the lease, or takes over an expired one)."""
    for _ in range(3):  # a lease released between our create and our read: try to create it again
      self.since = time.time()
      generation = self._store.create(self._body())
      if generation is not None:
        self.generation = generation
        return True
      got = self._store.read()
      if got is None:
        continue
      current = Holder(**json.loads(got[1]))
      if current.holder == self.holder:
        self.generation = got[0]
        return True
      if not current.expired():
        return False
      generation = self._store.replace(self._body(), got[0])  # only one of several takers matches
      if generation is not None:
        self.generation = generation
        return True
      return False
    return False

  def acquire(self, run: str = "") -> None:
    """try_acquire, or LeaseHeld naming the holder."""
    if not self.try_acquire():
      holder = read_holder(self.path)
      who = holder.describe() if holder else "another runner"
      raise LeaseHeld(f"{run or self.path} is held by {who}: wait for it to finish, or for its lease to expire "
                      f"({self.ttl_s:.0f} s after its last heartbeat) if that runner was killed.")

  def heartbeat(self) -> bool:
    """Renews the lease; False if it was lost (expired and taken over): then stop writing to the run."""
    if self.generation is None:
      return False
    generation = self._store.replace(self._body(), self.generation)
    self.generation = generation
    return generation is not None

  def handoff(self) -> str:
    """A token for `Lease.adopt` in another process (a sweep runner's worker), which then holds this lease."""
    return json.dumps(dict(path=self.path, ttl_s=self.ttl_s, holder=self.holder, generation=self.generation,
                           since=self.since))

  @classmethod
  def adopt(cls, token: str) -> "Lease":
    """The lease a `handoff` token names, held by this process from now on; its first heartbeat checks it."""
    t = json.loads(token)
    lease = cls(t["path"], t["ttl_s"])
    lease.holder, lease.generation, lease.since = t["holder"], t["generation"], t["since"]
    return lease

  def release(self) -> None:
    if self.generation is not None:
      self._store.delete(self.generation)
      self.generation = None

  @contextlib.contextmanager
  def kept_alive(self):
    """Heartbeats from a thread while the block runs; sets `self.lost` if the lease is lost, and releases it."""
    self.lost = threading.Event()
    stop = threading.Event()

    def beat():
      while not stop.wait(self.ttl_s / 3):
        if not self.heartbeat():
          self.lost.set()
          return

    thread = threading.Thread(target=beat, name="jaxreplay-lease", daemon=True)
    thread.start()
    try:
      yield self
    finally:
      stop.set()
      thread.join()
      self.release()
