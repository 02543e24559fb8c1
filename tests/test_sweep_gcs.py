"""`jaxreplay sweep` on a gs:// workdir (a loopback GCS server), where runners claim runs by lease objects, not
flock: one runner finishes a grid; a killed runner's run is taken over after its lease expires and resumed from
its checkpoint; two runners at once train every run exactly once; --status reads the bucket."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io, rundir
from test_sweeps import data, write_sweep  # noqa: F401  (data: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upload(data_dirs, bucket):  # noqa: F811
  out = []
  for d in data_dirs:
    url = f"{bucket}/data/{os.path.basename(str(d))}"
    io.upload_dir(str(d), url, last="meta.json")
    out.append(url)
  return out


def _runner(spec, workdir, host_cache, **env):
  return subprocess.Popen([sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={workdir}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAXREPLAY_CACHE=str(host_cache), PYTHONPATH=ROOT, **env))


def _table(workdir, host_cache):
  """This host's results table (a local cache of the bucket's final.json objects) and its attempts."""
  path = os.path.join(str(host_cache), "sweeps", hashlib.sha1(workdir.encode()).hexdigest()[:16], rundir.RESULTS)
  db = sqlite3.connect(path)
  results = {n: json.loads(m) for n, m in db.execute("SELECT name, metrics FROM results")}
  attempts = db.execute("SELECT name, pid, started, ended, status FROM attempts ORDER BY id").fetchall()
  db.close()
  return results, attempts


@pytest.mark.slow
def test_one_runner_finishes_a_grid_on_a_bucket(gcs_bucket, data, tmp_path):  # noqa: F811
  spec = write_sweep(tmp_path / "s.py", *_upload(data, gcs_bucket), steps=10, n_pre=1, ckpt_every=5, ft_steps=5)
  workdir = f"{gcs_bucket}/sweep"
  p = _runner(spec, workdir, tmp_path / "host")
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out
  results, attempts = _table(workdir, tmp_path / "host")
  assert sorted(results) == ["finetune/pretrain/seed=0", "pretrain/seed=0"]
  for name in results:
    assert io.read_json(f"{workdir}/runs/{name}/final.json") == results[name]
  assert io.listdir(f"{workdir}/{rundir.LOCKS}") == []  # every lease released
  assert [a[4] for a in attempts] == ["done", "done"]
  assert not os.path.exists(tmp_path / "gs:")
  # Another host (its own, empty cache) sees the whole sweep as done, read from the bucket.
  st = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={workdir}", "--status"],
                      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT,
                                                                          JAXREPLAY_CACHE=str(tmp_path / "other")))
  assert st.returncode == 0 and st.stdout.strip().splitlines()[-1] == "2 done of 2 runs", st.stdout + st.stderr


@pytest.mark.slow
def test_a_killed_runner_is_taken_over_and_two_runners_train_each_run_once(gcs_bucket, data, tmp_path):  # noqa: F811
  spec = write_sweep(tmp_path / "s.py", *_upload(data, gcs_bucket), steps=60, n_pre=2, ckpt_every=5, ft_steps=5)
  workdir = f"{gcs_bucket}/sweep"
  ttl = dict(JAXREPLAY_LEASE_TTL_S="10")  # beats every 3.3 s: room for a loaded machine
  hosts = [tmp_path / "host_a", tmp_path / "host_b"]
  p = _runner(spec, workdir, hosts[0], **ttl)
  ckpts = f"{workdir}/runs/pretrain/seed=0/checkpoints"
  deadline = time.monotonic() + 400
  while not any(n.isdigit() for n in io.listdir(ckpts)):
    assert time.monotonic() < deadline and p.poll() is None, "no checkpoint was written"
    time.sleep(0.5)
  p.send_signal(signal.SIGKILL)  # its lease stays behind, with no heartbeat: it expires after 10 s
  p.communicate()
  assert not io.exists(f"{workdir}/runs/pretrain/seed=0/final.json")
  procs = [_runner(spec, workdir, h, **ttl) for h in hosts]  # two hosts, each with its own results table
  outs = [q.communicate(timeout=900)[0] for q in procs]
  assert all(q.returncode == 0 for q in procs), outs
  names = ["finetune/pretrain/seed=0", "finetune/pretrain/seed=1", "pretrain/seed=0", "pretrain/seed=1"]
  done, spans = [], []
  for h in hosts:
    results, attempts = _table(workdir, h)
    assert sorted(results) == names  # each host's table holds every run, rebuilt from the final.json objects
    done += [a[0] for a in attempts if a[4] == "done"]
    spans += [(a[0], a[2], a[3] or time.time()) for a in attempts]
  assert sorted(done) == names  # every run finished exactly once, by one of the two hosts
  for i, (n, s, e) in enumerate(spans):  # and no run was trained by both at once
    assert not any(n == m and s < e2 and s2 < e for m, s2, e2 in spans[i + 1:]), spans
  first = io.read_metrics(f"{workdir}/runs/pretrain/seed=0")
  assert first[-1]["final"] and first[-1]["step"] == 60


def test_a_claim_on_a_bucket_is_a_heartbeated_lease_that_knows_when_it_is_lost(gcs_bucket, monkeypatch):
  from jaxreplay.experiments import sweepdir
  from jaxreplay.io import lease as lease_lib
  monkeypatch.setattr(sweepdir, "LEASE_TTL_S", 0.6)
  workdir = f"{gcs_bucket}/sweep"
  claim = sweepdir.Claim(workdir, "pretrain/seed=0")
  assert claim and not sweepdir.Claim(workdir, "pretrain/seed=0") and sweepdir.is_locked(workdir, "pretrain/seed=0")
  time.sleep(1.0)  # longer than the TTL: the heartbeats keep it
  assert not claim.lost() and not sweepdir.Claim(workdir, "pretrain/seed=0")
  # Another runner replaces it (as it would once the heartbeats stopped for a TTL): the holder sees it is lost.
  path = rundir.lease_file(workdir, "pretrain/seed=0")
  for _ in range(20):  # matched to the generation the holder last wrote (a heartbeat in between: try again)
    token = json.dumps(dict(path=path, ttl_s=60, holder="other-host:1:0", generation=claim.lease.generation, since=0))
    store = lease_lib.Lease.adopt(token)
    if store.heartbeat():
      break
  deadline = time.monotonic() + 5
  while not claim.lost():
    assert time.monotonic() < deadline
    time.sleep(0.05)
  claim.close()
  assert lease_lib.read_holder(path).holder == store.holder  # closing a lost claim deletes nothing
