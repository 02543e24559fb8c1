"""The self-generated replay cache on gs://: refills written as objects, read back by the next run without
sampling, and a damaged refill object reported."""

import io as bytes_io

import numpy as np
import pytest

from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import config as config_lib, io
from test_replay import fake_pretrain, frozen, make_config, make_self  # noqa: F401  (frozen: a fixture)


def test_the_replay_cache_lives_in_a_bucket(tmp_path, frozen, gcs_bucket, monkeypatch):  # noqa: F811
  fake_pretrain(tmp_path)
  c = make_config(tmp_path, cache_dir=f"{gcs_bucket}/replay_cache")
  first = make_self(c, frozen)
  rows = [np.asarray(first.next(s)[0]) for s in range(3)]
  assert first.sampled_refills == 2
  (digest,) = io.listdir(f"{gcs_bucket}/replay_cache")
  directory = f"{gcs_bucket}/replay_cache/{digest}"
  assert first.cache.directory == directory
  assert io.listdir(directory) == ["fingerprint.json", "refill_000000.npy", "refill_000001.npy"]
  stored = np.load(bytes_io.BytesIO(io.read_bytes(f"{directory}/refill_000001.npy")))
  np.testing.assert_array_equal(stored[:4], rows[2])  # refill 1's first block is step 2's rows

  second = make_self(c, frozen)
  monkeypatch.setattr(second, "sampler", None)  # it must not sample
  for s in range(3):
    np.testing.assert_array_equal(np.asarray(second.next(s)[0]), rows[s])
  assert second.sampled_refills == 0
  monkeypatch.undo()

  buf = bytes_io.BytesIO()
  np.save(buf, np.zeros((3, 3), np.int32))
  io.write_bytes(f"{directory}/refill_000000.npy", buf.getvalue())
  with pytest.raises(config_lib.ConfigError, match="refill_000000"):
    make_self(c, frozen).next(0)
