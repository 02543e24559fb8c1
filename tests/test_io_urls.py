"""jaxreplay.io on gs:// (a real loopback GCS server) and the one-sentence errors for paths that cannot work."""

import json
import os
import subprocess
import sys

import pytest

from gcs_server import gcs_bucket, gcs_server, http  # noqa: F401  (pytest fixtures)
from jaxreplay import io
from jaxreplay.errors import StorageError


def test_json_text_bytes_and_listing_round_trip_on_a_bucket(gcs_bucket, gcs_server):
  run = f"{gcs_bucket}/runs/a"
  io.write_json(io.join(run, "config.json"), {"lr": 1e-3})
  io.write_bytes(io.join(run, "ckpt", "blob"), b"\x00\x01")
  assert io.read_json(f"{run}/config.json") == {"lr": 1e-3}
  assert io.read_bytes(f"{run}/ckpt/blob") == b"\x00\x01"
  assert io.read_range(f"{run}/ckpt/blob", 1, 2) == b"\x01" and io.size(f"{run}/ckpt/blob") == 2
  assert io.listdir(run) == ["ckpt", "config.json"] and io.isdir(f"{run}/ckpt")
  assert io.exists(f"{run}/config.json") and not io.exists(f"{run}/final.json")
  # what io wrote is what the server holds, read back with plain HTTP (no client cache in between)
  status, body = http("GET", f"{gcs_server.url}/storage/v1/b/{gcs_bucket[5:]}/o/runs%2Fa%2Fconfig.json?alt=media")
  assert status == 200 and json.loads(body) == {"lr": 1e-3}
  io.rmtree(f"{run}/ckpt")
  assert io.listdir(run) == ["config.json"]


def test_an_error_inside_atomic_open_uploads_nothing(gcs_bucket):
  p = f"{gcs_bucket}/final.json"
  io.write_json(p, {"old": True})
  with pytest.raises(RuntimeError):
    with io.atomic_open(p) as f:
      f.write('{"new": ')
      raise RuntimeError("interrupted")
  assert io.read_json(p) == {"old": True}


def test_appender_keeps_one_whole_object_and_resumes_from_it(gcs_bucket, tmp_path):
  for p in (f"{gcs_bucket}/metrics.jsonl", str(tmp_path / "metrics.jsonl")):
    a = io.Appender(p, min_interval_s=3600)
    a.write(json.dumps({"step": 1}) + "\n")  # the first write is uploaded at once
    a.write(json.dumps({"step": 2}) + "\n")  # this one waits for the interval, or close
    assert [r["step"] for r in io.read_metrics(p.rsplit("/", 1)[0])] == ([1] if io.is_url(p) else [1, 2])
    a.close()
    b = io.Appender(p)  # a resumed writer continues the object, it does not start it again
    b.write(json.dumps({"step": 3}) + "\n")
    b.close()
    assert [r["step"] for r in io.read_metrics(p.rsplit("/", 1)[0])] == [1, 2, 3]


def test_check_writable_names_a_missing_bucket(gcs_bucket):
  assert io.check_writable(f"{gcs_bucket}/runs/x") == f"{gcs_bucket}/runs/x"
  assert io.listdir(f"{gcs_bucket}/runs/x") == []  # the probe object is gone again
  with pytest.raises(StorageError, match=r"^The bucket gs://no-such-bucket-1 does not exist .*create it"):
    io.check_writable("gs://no-such-bucket-1/runs/x")


def test_check_writable_names_a_directory_that_cannot_be_made(tmp_path):
  (tmp_path / "a_file").write_text("")  # a directory cannot be made under a file, even by root
  with pytest.raises(StorageError, match=r"^Cannot write to .*a_file/runs \(.*\): fix its permissions"):
    io.check_writable(str(tmp_path / "a_file" / "runs"))


def test_half_local_half_remote_and_collapsed_urls_are_refused(tmp_path):
  io.check_same_storage(workdir="gs://b/runs", data="gs://b/data", init=None)
  io.check_same_storage(workdir=str(tmp_path), data=str(tmp_path / "d"))
  with pytest.raises(StorageError, match=r"half local and half remote \(workdir=gs://b/runs, data=/"):
    io.check_same_storage(workdir="gs://b/runs", data=str(tmp_path))
  with pytest.raises(StorageError, match="half local and half remote"):
    io.check_same_storage(workdir="gs://b/runs", data="gs://other/data")
  with pytest.raises(StorageError, match=r"looks like the URL gs://bucket/runs/x with its '//' collapsed"):
    io.path(os.path.abspath("gs://bucket/runs/x"))
  assert io.abspath("gs://b/runs/") == "gs://b/runs"


def test_a_gs_path_without_gcsfs_names_the_extra_to_install():
  code = ("import sys; sys.modules['gcsfs'] = None\n"
          "from jaxreplay import io\n"
          "from jaxreplay.errors import StorageError\n"
          "try:\n  io.check_writable('gs://bucket/runs/x')\n"
          "except StorageError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == ("gs://bucket/runs/x is a gs:// path, which needs gcsfs: pip install 'jaxreplay[gcs]' "
                         "(or pip install gcsfs).")


def test_glob_finds_every_final_json_in_a_bucket_and_on_disk(gcs_bucket, tmp_path):
  for root in (gcs_bucket, str(tmp_path)):
    for name in ("runs/a/final.json", "runs/b/c/final.json", "runs/b/config.json"):
      io.makedirs(os.path.dirname(io.join(root, name)))
      io.write_json(io.join(root, name), {})
    assert io.glob(f"{root}/runs/**/final.json") == [f"{root}/runs/a/final.json", f"{root}/runs/b/c/final.json"]
