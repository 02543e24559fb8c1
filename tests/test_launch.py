"""Launchers: exact gcloud and sbatch command lines (fake binaries on PATH), a real local Ray cluster, and a
real two-process jax.distributed sweep worker on CPU."""
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from jaxreplay.experiments import runner

from helpers import token_dir
from test_tpu_compile import needs_libtpu, tiny_sweep_file
from test_sweeps import rows, shared_compile_cache, write_sweep  # noqa: F401 (a module fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""Records its arguments; answers like gcloud from a JSON state file (queued resource and node states)."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
path = os.environ["FAKE_STATE"]
st = json.load(open(path)) if os.path.exists(path) else {"qr": "", "node": ""}
cmd = " ".join(a for a in args if not a.startswith("--"))
if cmd.startswith("compute tpus queued-resources describe"):
  if not st["qr"]:
    sys.exit(1)
  print(st["qr"])
elif cmd.startswith("compute tpus tpu-vm describe"):
  print(st["node"])
elif cmd.startswith("compute tpus queued-resources create"):
  st.update(qr="ACTIVE", node="READY")
elif cmd.startswith("compute tpus queued-resources delete"):
  st.update(qr="", node="")
elif cmd.startswith("compute tpus tpu-vm ssh"):
  command = next(a for a in args if a.startswith("--command="))
  alive = st.get("running") and len(st.get("status", [])) > 1  # with "running": until its last status line
  if "--status" in command:  # worker 0's last status line: the next of st["status"] (the last one repeats)
    lines = st.get("status", ["3 done of 3 runs"])
    print(lines[0])
    st["status"] = lines[1:] or lines
  elif "echo stopped" in command:  # is the sweep still running on worker 0?
    print("running" if alive else "stopped")
  elif "nohup" in command and not alive:  # the start command: a real start (counted) unless still running
    st["starts"] = st.get("starts", 0) + 1
json.dump(st, open(path, "w"))
'''

FAKE_SBATCH = r'''#!/usr/bin/env python3
import json, os, sys
log = os.environ["FAKE_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\n")
print(f"{1000 + n};cluster")
'''


def fake_bin(tmp_path, name, text):
  d = tmp_path / "bin"
  d.mkdir(exist_ok=True)
  p = d / name
  p.write_text(text)
  p.chmod(p.stat().st_mode | stat.S_IEXEC)
  log, state = tmp_path / f"{name}.log", tmp_path / f"{name}.state"
  env = dict(os.environ, PATH=f"{d}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_STATE=str(state))
  return env, log, state


def calls(log):
  return [json.loads(l) for l in open(log)] if os.path.exists(log) else []


def tpu(env, *args):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), *args], env=env, cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  return r


WHERE = ["--zone=us-central2-b", "--project=proj"]
COMMON = ["--name=sw", "--zone=us-central2-b", "--project=proj"]


def test_tpu_commands(tmp_path):
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  tpu(env, "up", *COMMON, "--accelerator=v4-32")
  create = ["compute", "tpus", "queued-resources", "create", "sw-qr", "--node-id=sw", "--accelerator-type=v4-32",
            "--runtime-version=tpu-ubuntu2204-base", "--spot", *WHERE]
  assert calls(log) == [["compute", "tpus", "queued-resources", "describe", "sw-qr", "--format=value(state.state)",
                         *WHERE], create]
  tpu(env, "up", *COMMON, "--accelerator=v4-32")  # exists and ACTIVE: nothing created
  assert [c[3] for c in calls(log)[2:]] == ["describe", "describe"]
  log.unlink()
  tpu(env, "install", *COMMON, "--package=jaxreplay==0.1.0", "--setup=sudo mount -t nfs fs:/runs /mnt/runs")
  tpu(env, "run", *COMMON, "--sweep=sweeps/grid_2d.py", "--workdir=/mnt/runs/grid")
  tpu(env, "run", *COMMON, "--sweep=sweeps/grid_2d.py:small", "--workdir=/mnt/runs/g", "--mode=hosts", "--jobs=4")
  install, run, run_hosts = calls(log)
  assert install == ["compute", "tpus", "tpu-vm", "ssh", "sw", "--worker=all",
                     "--command=pip install -U 'jax[tpu]' jaxreplay==0.1.0 && mkdir -p ~/jaxreplay && "
                     "sudo mount -t nfs fs:/runs /mnt/runs", *WHERE]
  assert run[:6] == ["compute", "tpus", "tpu-vm", "ssh", "sw", "--worker=all"] and run[7:] == WHERE
  assert ("setsid nohup python -m jaxreplay.cli sweep sweeps/grid_2d.py --workdir=/mnt/runs/grid --multihost "
          ">> ~/jaxreplay-sweep.log") in run[6]
  assert "kill -0 $(cat ~/jaxreplay-sweep.pid)" in run[6]  # not started twice on a worker
  assert "sweep sweeps/grid_2d.py:small --workdir=/mnt/runs/g --jobs=4 >>" in run_hosts[6]


def test_tpu_watch_recreates_a_preempted_slice(tmp_path):
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  state.write_text(json.dumps({"qr": "ACTIVE", "node": "PREEMPTED"}))
  r = tpu(env, "watch", *COMMON, "--accelerator=v5litepod-16", "--runtime=v2-alpha-tpuv5-lite",
          "--sweep=sweeps/capacity.py", "--workdir=/mnt/runs/cap", "--package=jaxreplay", "--poll_s=0",
          "--down_when_done")
  assert "is PREEMPTED: re-creating it" in r.stdout and "finished" in r.stdout
  verbs = [" ".join(c[2:4]) for c in calls(log)]
  assert verbs == ["queued-resources describe", "tpu-vm describe",  # ACTIVE but the node was preempted
                   "queued-resources delete", "queued-resources create",
                   "queued-resources describe", "tpu-vm describe",  # ready again
                   "tpu-vm ssh", "tpu-vm ssh",  # install, status on worker 0: all done, nothing to start
                   "queued-resources delete"]
  c = calls(log)
  assert c[2] == ["compute", "tpus", "queued-resources", "delete", "sw-qr", "--force", "--quiet", *WHERE]
  assert c[3] == ["compute", "tpus", "queued-resources", "create", "sw-qr", "--node-id=sw",
                  "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot", *WHERE]
  assert c[7][5] == "--worker=0" and "--status" in c[7][6]


WATCH = [*COMMON, "--sweep=sweeps/capacity.py", "--workdir=/mnt/runs/cap", "--package=jaxreplay", "--poll_s=0"]


def test_tpu_watch_waits_for_an_unfinished_sweep(tmp_path):
  """A running sweep: watch polls worker 0's status, keeps the sweep started, and stops once all runs are done."""
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  state.write_text(json.dumps({"qr": "ACTIVE", "node": "READY", "running": True, "status": [
      "3 pending of 3 runs", "1 done, 1 pending, 1 running of 3 runs", "2 done, 1 running of 3 runs",
      "3 done of 3 runs", "3 done of 3 runs"]}))
  r = tpu(env, "watch", *WATCH)
  assert "finished in /mnt/runs/cap" in r.stdout
  ssh = [c[6] for c in calls(log) if c[2:4] == ["tpu-vm", "ssh"]]
  assert sum("--status" in x for x in ssh) == 4 and sum("nohup" in x for x in ssh) == 3, ssh
  assert "starts" not in json.loads(state.read_text())  # sent each unfinished cycle; the running sweep kept going
  assert not any("echo stopped" in x for x in ssh)  # no failed runs: never asked whether the sweep stopped


def test_tpu_watch_retries_a_failed_run_a_bounded_number_of_times_then_reports_it(tmp_path):
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  state.write_text(json.dumps({"qr": "ACTIVE", "node": "READY", "running": False,
                               "status": ["2 done, 1 failed of 3 runs"]}))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "watch", *WATCH, "--max_retries=2"],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "1 of 3 runs failed again after 2 retries" in r.stdout and "--status` lists them" in r.stdout
  assert json.loads(state.read_text())["starts"] == 2  # retried twice, then reported: not restarted forever
  # A failure while the sweep still runs (its other runs going on) is not a retry: watch waits for it.
  state.write_text(json.dumps({"qr": "ACTIVE", "node": "READY", "running": True,
                               "status": ["1 done, 1 failed, 1 running of 3 runs"] * 5 + ["2 done, 1 failed of 3 runs"]}))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "watch", *WATCH, "--max_retries=0"],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "after 0 retries" in r.stdout
  assert "starts" not in json.loads(state.read_text())  # never restarted: the running sweep was left alone


def test_tpu_accelerator_types_name_their_topologies():
  import tpu
  assert [tpu.topology(a) for a in ("v5litepod-4", "v5litepod-16", "v6e-8", "v4-8", "v4-32", "v5p-16", "v3-8")] == \
      ["v5e:2x2", "v5e:4x4", "v6e:2x4", "v4:2x2x1", "v4:2x2x4", "v5p:2x2x2", None]


@needs_libtpu
def test_tpu_up_refuses_a_sweep_that_does_not_fit_before_requesting_a_slice(tmp_path):
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  up = ["up", *COMMON, "--accelerator=v5litepod-4", f"--sweep={tiny_sweep_file(tmp_path / 'big.py', big=True)}"]
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), *up], env=env, cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 2, r.stdout + r.stderr
  assert "failed its fit check on v5e:2x2, so no slice was requested: Runs pre/" in r.stderr
  assert "--no-fit-check requests it anyway" in r.stderr and "TOO BIG" in r.stdout
  assert calls(log) == []  # not even a describe: nothing was asked of gcloud
  tpu(env, *up, "--no-fit-check")  # told to go ahead: requested without compiling
  assert [c[2:4] for c in calls(log)] == [["queued-resources", "describe"], ["queued-resources", "create"]]


@needs_libtpu
def test_tpu_up_requests_a_slice_for_a_sweep_that_fits(tmp_path):
  env, log, state = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  r = tpu(env, "up", *COMMON, "--accelerator=v5litepod-4", f"--sweep={tiny_sweep_file(tmp_path / 's.py')}")
  assert "sweep" in r.stdout and "--dry-run --target=v5e:2x2" in r.stdout and "chip-hours" in r.stdout
  assert [c[2:4] for c in calls(log)] == [["queued-resources", "describe"], ["queued-resources", "create"]]
  assert "--accelerator-type=v5litepod-4" in calls(log)[1]


def test_slurm_arrays_chained_by_level(tmp_path):
  env, log, _ = fake_bin(tmp_path, "sbatch", FAKE_SBATCH)
  w = str(tmp_path / "w")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "slurm.py"), "sweeps/pretrain_length.py",
                      f"--workdir={w}", "--partition=gpu", "--gpus=1", "--max_parallel=8", "--time=12:00:00",
                      "--setup=source .venv/bin/activate", "--submit"], env=env, cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  level0, level1 = (os.path.join(w, "slurm", f"level{k}.sbatch") for k in (0, 1))
  assert calls(log) == [["--parsable", level0], ["--parsable", "--dependency=afterany:1000", level1]]
  text = open(level1).read()
  assert "#SBATCH --array=0-48%8" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --partition=gpu" in text
  assert "#SBATCH --signal=B:TERM@120" in text and "#SBATCH --requeue" in text
  assert f"exec python -m jaxreplay.experiments.runner worker --workdir={w} --level=1 --index=$SLURM_ARRAY_TASK_ID" in text
  assert "#SBATCH --array=0-6%8" in open(level0).read()
  assert subprocess.run(["bash", "-n", level0]).returncode == 0
  assert subprocess.run(["bash", "-n", os.path.join(w, "slurm", "submit.sh")]).returncode == 0
  # Array index → run: the same order the runner uses.
  runs, _ = runner.load_runs(w)
  assert runner.levels(runs)[1][0] == "finetune/pretrain/tpp=10/coeff=0.01"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return token_dir(root / "a", dataset_id=0, seed=0, step=3), token_dir(root / "b", dataset_id=1, seed=1, step=5)


def test_ray_local_cluster_runs_a_sweep(tmp_path, data):
  ray = pytest.importorskip("ray", reason="ray is not installed (pip install jaxreplay[ray])")
  import ray_sweep
  spec = write_sweep(tmp_path / "s.py", *data, steps=10, n_pre=1)
  w = str(tmp_path / "w")
  try:
    out = ray_sweep.run_sweep(spec, w, cpus=1, address="local",
                              ray_init=dict(num_cpus=2, include_dashboard=False, log_to_driver=False))
  finally:
    ray.shutdown()
  assert set(out) == {"pretrain/seed=0", "finetune/pretrain/seed=0"}
  assert all("error" not in r for r in out.values()), out
  results, attempts = rows(w)
  assert set(results) == set(out) and [a[4] for a in attempts] == ["done", "done"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_multihost_sweep_worker_two_processes(tmp_path, data):
  """Two processes joined by jax.distributed (CPU, gloo) train each run of the sweep together."""
  spec = write_sweep(tmp_path / "s.py", *data, steps=10, n_pre=1)
  w = str(tmp_path / "w")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={w}", "--multihost",
                             f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=600)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  results, _ = rows(w)
  assert set(results) == {"pretrain/seed=0", "finetune/pretrain/seed=0"}
  assert "done   pretrain/seed=0 (2 processes)" in outs[0] and "done" not in outs[1], outs
  assert results["pretrain/seed=0"]["step"] == 10
