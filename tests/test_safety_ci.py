"""The safety checks of tests/test_sweeps.py and tests/test_launch.py that run only under `-m slow`, at CI size:
a runner SIGKILLed mid-sweep and two runners sharing its workdir; `sweep --multihost` and `pretrain --multihost`
over two jax.distributed processes on CPU (gloo). Real CLI subprocesses on a tiny model, a few steps each."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxreplay.experiments import runner

from helpers import token_dir
from test_sweeps import _no_overlap, _wait_for, rows, shared_compile_cache, write_sweep  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return token_dir(root / "a", dataset_id=0, seed=0, step=3), token_dir(root / "b", dataset_id=1, seed=1, step=5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_killed_runner_resumes_and_two_runners_share_the_work(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data, steps=24, n_pre=2, ckpt_every=4, ft_steps=4)
  w = str(tmp_path / "w")
  args = [sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={w}"]
  p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ckpts = os.path.join(runner.run_dir(w, "pretrain/seed=0"), "checkpoints")
  _wait_for(lambda: os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)), what="a checkpoint")
  p.send_signal(signal.SIGKILL)
  p.wait()
  _wait_for(lambda: not runner.is_locked(w, "pretrain/seed=0"), timeout=60, what="the claim to be released")
  assert not runner.is_finished(w, "pretrain/seed=0")
  procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
  outs = [q.communicate(timeout=600)[0].decode() for q in procs]
  assert all(q.returncode == 0 for q in procs), outs
  results, attempts = rows(w)
  assert sorted(results) == sorted(["pretrain/seed=0", "pretrain/seed=1", "finetune/pretrain/seed=0",
                                    "finetune/pretrain/seed=1"])
  _no_overlap(attempts)
  done = [a[0] for a in attempts if a[4] == "done"]
  assert sorted(done) == sorted(results)  # every run finished exactly once
  started = [line.split()[2] for out in outs for line in out.splitlines() if " start " in line]
  assert len(started) == len(set(started)), outs  # the two runners never start the same run
  assert "pretrain/seed=0" in started  # the killed run was taken up again...
  steps = [json.loads(l)["step"] for l in open(os.path.join(runner.run_dir(w, "pretrain/seed=0"), "metrics.jsonl"))
           if "train_loss" in l]
  assert steps == [5, 10, 15, 20, 24] and results["pretrain/seed=0"]["step"] == 24  # ... to its end, each step once


def test_multihost_sweep_two_processes(tmp_path, data):
  """Two processes joined by jax.distributed (CPU, gloo) train each run of the sweep together; host 0 reports."""
  spec = write_sweep(tmp_path / "s.py", *data, steps=4, n_pre=1, ft_steps=2)
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
  assert results["pretrain/seed=0"]["step"] == 4 and results["finetune/pretrain/seed=0"]["step"] == 2


CONFIG = textwrap.dedent("""
    from jaxreplay import config as config_lib
    def get_config(arg=""):
      c = config_lib.default()
      c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
      c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=64)
      c.eval.update(every_steps=3, tokens=256, batch_size=8)
      c.checkpoint.update(every_steps=3, every_minutes=0.0, async_save=False)
      c.log.update(every_steps=1, progress=False)
      c.stop.steps = 6
      c.data.path = {data!r}
      return c
""")


def test_multihost_pretrain_two_processes_equals_one(tmp_path, data):
  """`pretrain --multihost` with the coordinator and process ids from the environment (as a cluster sets them;
  here Open MPI's variables): two processes train the global batch together, as one process does alone."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG.format(data=data[0]))
  cmd = [sys.executable, "-m", "jaxreplay.cli", "pretrain", f"--config={cfg}"]
  one = subprocess.run([*cmd, f"--workdir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen([*cmd, f"--workdir={tmp_path / 'two'}", "--multihost"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(
                                os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                OMPI_MCA_orte_hnp_uri="1.0;tcp://127.0.0.1:1", OMPI_COMM_WORLD_SIZE="2",
                                OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK="0", JAX_LOCAL_DEVICE_IDS="0"))
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in outs]
  final = {d: json.load(open(tmp_path / d / "final.json")) for d in ("one", "two")}
  assert final["two"]["step"] == final["one"]["step"] == 6
  assert final["two"]["valid_ntp"] == pytest.approx(final["one"]["valid_ntp"], rel=1e-4)
  losses = {d: [json.loads(l)["train_loss"] for l in open(tmp_path / d / "metrics.jsonl") if "train_loss" in l]
            for d in ("one", "two")}
  assert len(losses["two"]) == 6 and losses["two"] == pytest.approx(losses["one"], rel=1e-4)  # host 0 logs, once
