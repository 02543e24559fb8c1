"""A run on a bucket whose start (init.from) or shared replay cache is on one host's disk is refused before anything
is read or written: one sentence, exit 2, through the real CLI (the bucket is never reached, so no server)."""

from jaxreplay import config as config_lib
from jaxreplay.errors import StorageError
from jaxreplay.experiments import resolve
from test_cli_errors import check_all, files  # noqa: F401  (files: a fixture)

import pytest


def test_a_half_local_half_remote_run_is_one_sentence(files, tmp_path):  # noqa: F811
  exp, run = files["exp"], "gs://no-such-bucket/runs/x"
  check_all([
      (["finetune", f"--config={exp}:finetune", f"--config.init.from={tmp_path}", f"--workdir={run}"],
       "half local and half remote", {}),
      (["pretrain", f"--config={exp}", f"--config.replay.cache_dir={tmp_path}/samples", f"--workdir={run}"],
       "half local and half remote", {}),
  ], files["dir"])


def test_check_storage_refuses_only_local_inputs_of_a_bucket_run(tmp_path):
  c = config_lib.default()
  c.init["from"] = str(tmp_path)
  with pytest.raises(StorageError, match=r"half local and half remote .*init.from="):
    resolve.check_storage(c, "gs://b/runs/x")
  resolve.check_storage(c, str(tmp_path / "local-run"))  # local run, local start
  c.init["from"] = "gs://b/runs/parent"
  resolve.check_storage(c, "gs://b/runs/x")  # both in the bucket
  resolve.check_storage(c, str(tmp_path / "local-run"))  # a local run may start from a bucket's export
  c.data.path = str(tmp_path / "tokens")  # per-host token data stays allowed
  resolve.check_storage(c, "gs://b/runs/x")
