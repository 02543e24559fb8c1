"""`jaxreplay report` and `sweep --status` on a gs:// sweep workdir (a loopback GCS server): the results table is
rebuilt in this host's cache from the bucket's final.json objects, and the report equals the one made from the
same sweep on a local disk."""

import csv
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys

from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io, rundir
from jaxreplay.experiments import report, sweepdir
from jaxreplay.experiments.sweeps import Run
from test_report import en_es  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_bucket_sweep(local, url) -> list[Run]:
  """The local sweep (runs written by test_report.add_run) as a runner on a bucket leaves it: sweep.json, and per
  run config.json, metrics.jsonl and final.json objects; no results table (that is each host's own cache)."""
  db = sqlite3.connect(os.path.join(str(local), rundir.RESULTS))
  runs = [Run(name=n, stage=s, parent=p, overrides=json.loads(o), config=json.loads(c))
          for n, s, p, o, c in db.execute("SELECT name, stage, parent, overrides, config FROM results")]
  db.close()
  io.write_json(io.join(url, rundir.SWEEP), dict(fingerprint="fp", spec="s.py", created=0.0,
                                                 runs=[dataclasses.asdict(r) for r in runs]))
  for r in runs:
    d = sweepdir.run_dir(str(local), r.name)
    with open(rundir.config_file(d), "w") as f:
      json.dump(r.config, f)
    io.upload_dir(d, sweepdir.run_dir(url, r.name), last=rundir.FINAL)
  return runs


def _report(url, out, cache):
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "report", url, "--out", str(out)], cwd=ROOT,
                        capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAXREPLAY_CACHE=str(cache)))


def _rows(path):  # the rows of a results.csv, whatever the order of its rows and columns
  with open(path, newline="") as f:
    return sorted(json.dumps(row, sort_keys=True) for row in csv.DictReader(f))


def _read(path):
  with open(path) as f:
    return f.read()


def test_report_and_status_read_a_bucket_sweep(en_es, gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
  url = f"{gcs_bucket}/sweep"
  runs = _as_bucket_sweep(en_es, url)
  local = report.report(str(en_es), str(tmp_path / "local"))

  p = _report(url, tmp_path / "remote", tmp_path / "host")
  assert p.returncode == 0, p.stdout + p.stderr
  assert {os.path.basename(x) for x in p.stdout.split()} == {os.path.basename(x) for x in local}
  assert _read(tmp_path / "remote" / "matched.md") == _read(tmp_path / "local" / "matched.md")
  assert _rows(tmp_path / "remote" / "results.csv") == _rows(tmp_path / "local" / "results.csv")
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(os.path.join(ROOT, "gs:"))

  # Another host finishes a run: the next report on this host (its cache already filled) has its row too.
  extra = "finetune/pretrain/late"
  io.write_json(io.join(sweepdir.run_dir(url, extra), rundir.CONFIG), dict(seed=1))
  io.write_json(rundir.final_file(sweepdir.run_dir(url, extra)), dict(valid_ntp=2.5, prev_ntp=3.3, step=7))
  spec = io.read_json(io.join(url, rundir.SWEEP))
  spec["runs"].append(dict(name=extra, stage="finetune", parent="pretrain", overrides={"seed": 1},
                           config=dict(seed=1)))
  pending = dict(name="finetune/pretrain/pending", stage="finetune", parent="pretrain", overrides={"seed": 2},
                 config=dict(seed=2))
  spec["runs"].append(pending)
  io.write_json(io.join(url, rundir.SWEEP), spec)
  p = _report(url, tmp_path / "remote2", tmp_path / "host")
  assert p.returncode == 0, p.stdout + p.stderr
  rows = _read(tmp_path / "remote2" / "results.csv").splitlines()
  assert len(rows) == 1 + len(runs) + 1 and any(r.startswith(extra + ",") and ",2.5," in r for r in rows), rows

  # --status on a host with an empty cache: the bucket's runs, done or not.
  monkeypatch.setenv("JAXREPLAY_CACHE", str(tmp_path / "other"))
  all_runs, _ = sweepdir.load_runs(url)
  lines = sweepdir.status(url, all_runs).splitlines()
  assert lines[-1] == f"{len(runs) + 1} done, 1 pending of {len(runs) + 2} runs", lines
  assert any(line.startswith(extra) and "2.5000" in line for line in lines)


def test_report_of_a_bucket_without_a_sweep_is_one_sentence(gcs_bucket, tmp_path):  # noqa: F811
  p = _report(f"{gcs_bucket}/nothing", tmp_path / "o", tmp_path / "host")
  assert p.returncode == 2 and "holds no sweep.json" in p.stderr and "Traceback" not in p.stderr, p.stderr
