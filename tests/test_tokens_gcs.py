"""Token directories on gs://: tokenized straight to a bucket, read through a per-host local copy that is
downloaded once, giving the same batches as the local directory."""

import os

import numpy as np
import pytest

import helpers
from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io
from jaxreplay.data import tokenfile
from jaxreplay.data.loader import TrainBatches, eval_batches
from jaxreplay.errors import DataError


def test_a_token_dir_in_a_bucket_gives_the_local_batches_and_is_downloaded_once(gcs_bucket, tmp_path, monkeypatch):
  local = str(tmp_path / "tokens")
  helpers.token_dir(local, vocab_size=64, train_tokens=5000, valid_tokens=1000)
  url = f"{gcs_bucket}/data/tokens"
  io.upload_dir(local, url, last="meta.json")
  monkeypatch.setenv("JAXREPLAY_CACHE", str(tmp_path / "cache"))
  assert tokenfile.read_meta(url) == tokenfile.read_meta(local)
  td = tokenfile.open_token_dir(url, 64, 16)
  assert td.path == url
  a, b = TrainBatches(url, 16, 8, seed=3), TrainBatches(local, 16, 8, seed=3)
  for step in (0, 1, 57):
    np.testing.assert_array_equal(a.batch(step), b.batch(step))
  np.testing.assert_array_equal(eval_batches(url, seq_len=16, batch_size=4)[1],
                                eval_batches(local, seq_len=16, batch_size=4)[1])
  copies = os.listdir(tmp_path / "cache" / "remote_tokens")
  assert len(copies) == 1
  copy = tmp_path / "cache" / "remote_tokens" / copies[0] / "train.bin"
  mtime = os.path.getmtime(copy)
  tokenfile.open_token_dir(url, 64, 16)
  assert os.path.getmtime(copy) == mtime  # opened again from the copy, not downloaded again


def test_tokenize_writes_a_token_dir_to_a_bucket(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREPLAY_CACHE", str(tmp_path / "cache"))
  docs = [f"document {i} says hello to the bucket" for i in range(200)]
  tok = str(tmp_path / "tok.json")
  from jaxreplay.data.tokenizer import train_tokenizer
  train_tokenizer(docs, 300, tok)
  url = f"{gcs_bucket}/data/docs"
  meta = tokenfile.write_token_dir(url, docs, tok, dataset_id=1, progress=False)
  assert io.listdir(url) == ["meta.json", "tokenizer.json", "train.bin", "valid.bin"]
  td = tokenfile.open_token_dir(url)
  assert td.meta == meta and td.train.size == meta["train_tokens"] > 0


def test_a_missing_token_dir_in_a_bucket_is_one_sentence(gcs_bucket):
  with pytest.raises(DataError, match=r"^Token directory gs://.*/nothing does not exist"):
    tokenfile.open_token_dir(f"{gcs_bucket}/nothing")
