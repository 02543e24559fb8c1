"""`jaxreplay eval` on a run of a gs:// sweep (a loopback GCS server): the model is downloaded once to this host's
cache, the scores equal those of the same run on a local disk, lm_eval.json goes to the bucket and the scores to
this host's copy of the sweep table."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io, rundir
from jaxreplay.experiments import sweepdir
from test_lm_eval import paper_run  # noqa: F401  (a fixture)

pytest.importorskip("lm_eval")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval(run, tasks, cache):
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "eval", f"--workdir={run}", "--tasks=tiny_mc,tiny_ppl",
                         "--limit=2", f"--include_path={tasks}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, PYTHONPATH=ROOT, JAXREPLAY_CACHE=str(cache)))


def test_eval_reads_a_run_on_a_bucket(paper_run, gcs_bucket, tmp_path):  # noqa: F811
  sweep = f"{gcs_bucket}/sweep"
  io.write_text(io.join(sweep, rundir.SWEEP), "{}")
  run = sweepdir.run_dir(sweep, "pretrain/tiny")
  io.upload_dir(paper_run["run"], run)
  remote = _eval(run, paper_run["tasks"], tmp_path / "host")
  assert remote.returncode == 0, remote.stderr[-2000:]
  local = _eval(paper_run["run"], paper_run["tasks"], tmp_path / "other")
  assert local.returncode == 0, local.stderr[-2000:]
  saved = io.read_json(io.join(run, rundir.LM_EVAL))
  assert saved["scores"] == json.load(open(os.path.join(paper_run["run"], rundir.LM_EVAL)))["scores"]
  with sqlite3.connect(os.path.join(str(tmp_path / "host"), "sweeps", sweepdir.results_file(sweep).split(
      os.sep)[-2], rundir.RESULTS)) as db:
    rows = {(t, m): v for n, t, m, v in db.execute("SELECT name, task, metric, value FROM lm_eval")}
  assert rows[("tiny_mc", "acc")] == saved["scores"]["tiny_mc"]["acc"]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
