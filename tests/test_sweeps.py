"""Sweep definitions, the paper's sweep files, and the local runner with real worker processes."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from jaxreplay.errors import ConfigError, SweepError
from jaxreplay import config as config_lib
from jaxreplay.experiments import runner
from jaxreplay.experiments import results_table
from jaxreplay.experiments import sweeps

from helpers import tiny_config, token_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's pretrain/finetune experiments (sweeps/instruct.py: tests/test_instruct_sweep.py).
PAPER_FILES = [os.path.join(ROOT, "sweeps", f + ".py") for f in (
    "quickstart", "pretrain_length", "model_size", "grid_2d", "capacity", "learning_rate", "method_comparison",
    "high_lr", "toy_continual", "batch_size_b2")]


def base(**stop):
  return tiny_config("/nonexistent", **stop)


# ------------------------------------------------------------------------------------------------ definitions

def test_grids_names_and_dependencies():
  g = sweeps.product({"model.d_model": [32, 64]}, sweeps.zip_({"optim.lr": [1e-3, 3e-4], "seed": [1, 2]}))
  assert len(g) == 4 and g[1] == {"model.d_model": 32, "optim.lr": 3e-4, "seed": 2}
  assert sweeps.chain({"seed": [1]}, [{"seed": 2}]) == [{"seed": 1}, {"seed": 2}]
  s = sweeps.Sweep()
  pre = s.stage("pretrain", base(), sweeps.product({"model.d_model": [32, 64]}, {"stop.tokens_per_param": [20.0]}))
  s.stage("finetune", base(), {"replay.coeff": [0.1, 10.0], "replay.method": ["kl"]}, after=pre)
  runs = sweeps.expand(s)
  names = [r.name for r in runs]
  assert names[:2] == ["pretrain/d=32,tpp=20", "pretrain/d=64,tpp=20"]
  assert "finetune/pretrain/d=64,tpp=20/coeff=10,method=kl" in names and len(runs) == 6
  child = next(r for r in runs if r.parent == "pretrain/d=32,tpp=20")
  assert child.config["init"]["from"] == "pretrain/d=32,tpp=20" and child.config["stage"] == "finetune"
  wide = next(r for r in runs if r.parent == "pretrain/d=64,tpp=20")
  assert base().model.d_model == 32 and wide.config["model"]["d_model"] == 64  # the parent's width, not the base's
  assert [r.name for r in sweeps.expand(s)] == names  # deterministic
  assert sweeps.fingerprint(sweeps.expand(s)) == sweeps.fingerprint(runs)
  # Matching parents: each arm continues its own chain; a selected parent by its overrides.
  s2 = sweeps.Sweep()
  a = s2.stage("a", base())
  b = s2.stage("b", base(), {"replay.method": ["none", "kl"]}, after=a)
  s2.stage("c", base(), {"replay.method": ["none", "kl"]}, after=b, match=("replay.method",))
  s2.stage("d", base(), after=(b, {"replay.method": "kl"}))
  names = [r.name for r in sweeps.expand(s2)]
  assert names == ["a", "b/a/method=none", "b/a/method=kl", "c/b/a/method=none", "c/b/a/method=kl", "d/b/a/method=kl"]


def test_long_labels_get_a_hash_and_are_safe_paths():
  long = {"data.path": "/some/very/long/path/" + "x" * 120}
  lab = sweeps.label(long)
  assert len(lab) <= sweeps.MAX_LABEL and "~" in lab and "/" not in lab
  assert lab != sweeps.label({"data.path": "/some/very/long/path/" + "y" * 120})
  assert sweeps.format_value(1e-7) == "1e-7" and sweeps.format_value(31.6) == "31.6"
  assert sweeps.format_value(17000.0) == "17000" and sweeps.format_value(True) == "true"


@pytest.mark.parametrize("make, match", [
    (lambda s: s.stage("p", base(), {"model.d_modl": [1]}), "Grid key 'model.d_modl' of stage 'p' is not a config"),
    (lambda s: s.stage("p", base(), {"optim": [1]}), "Grid key 'optim' .* is not a config key"),
    (lambda s: s.stage("f", base(), after="nope"), "starts from stage 'nope', which is not defined"),
    (lambda s: s.stage("f", base(), after=["pretrain/x"]), "starts from 'pretrain/x', which the sweep does not define"),
    (lambda s: s.stage("p", base(), {"seed": [1, 1]}), "both named 'p/seed=1'"),
    (lambda s: s.stage("p", base(), {"optim.lr": ["fast"]}), "wrong type"),
    (lambda s: s.stage("p", base(), {"optim.lr": 0.1}), r"needs a list of values"),
])
def test_bad_definitions_are_one_clear_error(make, match):
  s = sweeps.Sweep()
  with pytest.raises(SweepError, match=match):
    make(s)
    sweeps.expand(s)


def test_cycles_and_invalid_configs_are_refused():
  runs = {n: sweeps.Run(n, "s", p, {}, {}) for n, p in [("a", "c"), ("b", "a"), ("c", "b"), ("d", None)]}
  with pytest.raises(SweepError, match="cycle"):
    sweeps.dependency_order(runs)
  s = sweeps.Sweep()
  s.stage("p", base(), {"optim.lr": [-1.0]})
  with pytest.raises(ConfigError, match=r"Run 'p/lr=-1': config.optim.lr=-1.0 is invalid"):
    sweeps.expand(s)


@pytest.mark.parametrize("path", PAPER_FILES, ids=os.path.basename)
@pytest.mark.parametrize("variant", ["", "small"])
def test_paper_sweep_files_expand_and_validate(path, variant):
  runs = sweeps.expand(sweeps.load(path + (":" + variant if variant else "")))  # validates every run
  assert runs and len({r.name for r in runs}) == len(runs)
  if variant == "small":
    for r in runs:
      assert r.config["model"]["d_model"] <= 64, r.name
      assert r.config["data"]["path"].startswith("default:") or "toy" in path


def test_paper_grids_have_the_papers_sizes():
  count = lambda f, stage: sum(r.stage == stage for r in sweeps.expand(sweeps.load(f"{ROOT}/sweeps/{f}.py")))
  assert count("grid_2d", "pretrain") == 169 and count("grid_2d", "finetune") == 338
  assert count("capacity", "pretrain") == 13 and count("capacity", "finetune") == 13
  assert count("learning_rate", "finetune") == 6 * 7 * 2
  assert count("high_lr", "finetune") == 17 + 8
  assert count("method_comparison", "finetune") == 6
  assert count("model_size", "finetune") == 50 and count("pretrain_length", "finetune") == 49


# ------------------------------------------------------------------------------------------------ the runner

def write_sweep(path, data_a, data_b, steps=20, n_pre=2, ckpt_every=10, log_every=5, pack=1, ft_steps=10,
                kl_coeffs=()):
  """A sweep file of tiny real runs: n_pre pretraining runs, one finetuning run after each (one per coefficient
  of real-data KL replay in `kl_coeffs`), packed by `pack`. It imports no JAX (the runner process stays light);
  the config is tests/helpers.tiny_config with one layer."""
  replay = 'ft.replay.update(method="kl", source="real")' if kl_coeffs else "pass"
  grid = {"replay.coeff": list(kl_coeffs)} if kl_coeffs else None
  path.write_text(textwrap.dedent(f"""
      from jaxreplay import config
      from jaxreplay.experiments import sweeps

      def tiny(data, steps):
        c = config.default()
        c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
        c.data.path = data
        c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=256)
        c.eval.update(every_tokens=128 * 10, tokens=1024, batch_size=8)
        c.checkpoint.update(every_steps={ckpt_every}, every_minutes=0.0, async_save=False)
        c.log.update(every_steps={log_every}, progress=False)
        c.stop.steps = steps
        return c

      def get_sweep(arg=""):
        s = sweeps.Sweep(pack={pack})
        s.stage("pretrain", tiny({data_a!r}, {steps}), {{"seed": list(range({n_pre}))}})
        ft = tiny({data_b!r}, {ft_steps})
        {replay}
        s.stage("finetune", ft, {grid!r}, after="pretrain")
        return s
      """))
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return token_dir(root / "a", dataset_id=0, seed=0, step=3), token_dir(root / "b", dataset_id=1, seed=1, step=5)


def rows(workdir):
  db = sqlite3.connect(os.path.join(workdir, "results.sqlite"))
  out = {n: json.loads(m) for n, m in db.execute("SELECT name, metrics FROM results")}
  attempts = db.execute("SELECT name, pid, started, ended, status FROM attempts ORDER BY id").fetchall()
  db.close()
  return out, attempts


@pytest.fixture(scope="module", autouse=True)
def shared_compile_cache():
  """Workers of every test (and every test session) share compiled steps: compiling dominates tiny runs."""
  old = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
      "JAXREPLAY_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxreplay", "jax_cache_tests"))
  yield
  if old is None:
    del os.environ["JAX_COMPILATION_CACHE_DIR"]
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = old


def cli(*args, **kw):
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", *args], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5"), **kw)


def test_cli_errors_before_anything_runs(tmp_path, data):
  bad = tmp_path / "bad.py"
  bad.write_text("from jaxreplay import config\nfrom jaxreplay.experiments import sweeps\n"
                 "def get_sweep(arg=''):\n  s = sweeps.Sweep()\n  s.stage('p', config.default(), {'optim.lrr': [1]})\n"
                 "  return s\n")
  r = cli(str(bad), f"--workdir={tmp_path}/w")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
  assert "Grid key 'optim.lrr' of stage 'p' is not a config key" in r.stderr
  assert not os.path.exists(tmp_path / "w")
  # A workdir made by another definition is refused, whatever the flags.
  one = write_sweep(tmp_path / "one.py", *data)
  two = write_sweep(tmp_path / "two.py", *data, n_pre=3)
  runner.prepare(one, str(tmp_path / "w2"))
  for extra in ([], ["--dry-run"]):
    r = cli(two, f"--workdir={tmp_path}/w2", *extra)
    assert r.returncode == 2 and "holds results of a different sweep definition (2 runs added" in r.stderr, r.stderr
    assert "or --extend, when runs were only added" in r.stderr
  # --extend accepts runs added to the recorded definition, and records the larger one; it never accepts removed ones.
  r = cli(two, f"--workdir={tmp_path}/w2", "--extend", "--dry-run")
  assert r.returncode == 0 and "6 runs in dependency order" in r.stdout, r.stdout + r.stderr
  runner.prepare(two, str(tmp_path / "w2"), extend=True)
  r = cli(two, f"--workdir={tmp_path}/w2", "--dry-run")
  assert r.returncode == 0, r.stderr
  r = cli(one, f"--workdir={tmp_path}/w2", "--extend", "--dry-run")
  assert r.returncode == 2 and "(2 runs removed" in r.stderr and "--extend" not in r.stderr, r.stderr
  runner.prepare(one, str(tmp_path / "w3"))
  r = cli(one, f"--workdir={tmp_path}/w3", "--dry-run", "--only=seed=1")
  names = [line.split()[0] for line in r.stdout.split("\n")[2:4]]
  assert r.returncode == 0 and names == ["pretrain/seed=1", "finetune/pretrain/seed=1"], r.stdout


def test_runner_runs_in_order_skips_finished_and_records(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data, steps=10, n_pre=1)
  w = str(tmp_path / "w")
  r = cli(spec, f"--workdir={w}", "--jobs=2")
  assert r.returncode == 0, r.stdout + r.stderr
  results, attempts = rows(w)
  assert sorted(results) == ["finetune/pretrain/seed=0", "pretrain/seed=0"]
  assert [a[4] for a in attempts] == ["done", "done"] and attempts[1][2] >= attempts[0][3]  # in order
  assert results["finetune/pretrain/seed=0"]["step"] == 10 and "prev_ntp" in results["finetune/pretrain/seed=0"]
  ft_cfg = config_lib.from_json_file(os.path.join(runner.run_dir(w, "finetune/pretrain/seed=0"), "config.json"))
  assert ft_cfg.init["from"] == runner.run_dir(w, "pretrain/seed=0")
  # Nothing left to do: a second start trains nothing; a lost table is rebuilt from the runs' final.json.
  os.remove(os.path.join(w, "results.sqlite"))
  r = cli(spec, f"--workdir={w}")
  assert r.returncode == 0 and "start" not in r.stdout and "2/2 runs finished" in r.stdout
  assert set(rows(w)[0]) == set(results)
  assert [r["name"] for r in results_table.Results(w).rows] == ["pretrain/seed=0", "finetune/pretrain/seed=0"]
  status = cli(spec, f"--workdir={w}", "--status").stdout
  assert status.count("  done  ") == 2 and "2 done of 2 runs" in status


def test_launchers_worker_waits_skips_a_claimed_run_and_trains_one(tmp_path, data):
  """`python -m jaxreplay.experiments.runner worker` as launch/ starts it: exit 4 while the parent has not
  finished, 3 while another process holds the run's claim, 0 once it has trained (or found) the run."""
  spec = write_sweep(tmp_path / "s.py", *data, steps=10, n_pre=1)
  w = str(tmp_path / "w")
  runner.prepare(spec, w)
  pre, ft = "pretrain/seed=0", "finetune/pretrain/seed=0"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  worker = lambda *args: subprocess.run([sys.executable, "-m", "jaxreplay.experiments.runner", "worker",
                                         f"--workdir={w}", *args], capture_output=True, text=True, cwd=ROOT,
                                        env=env, timeout=600)
  r = worker(f"--run={ft}")
  assert r.returncode == 4 and f"waits for {pre}" in r.stderr, r.stderr
  claim = runner.Claim(w, pre)  # another process trains it
  r = worker("--level=0", "--index=0")
  claim.close()
  assert r.returncode == 3 and "being trained by another process" in r.stderr, r.stderr
  r = worker("--level=0", "--index=0")
  assert r.returncode == 0 and runner.is_finished(w, pre), r.stdout + r.stderr
  os.remove(os.path.join(w, "results.sqlite"))  # a resubmitted task trains nothing and records the run
  r = worker(f"--run={pre}")
  results, attempts = rows(w)
  assert r.returncode == 0 and list(results) == [pre] and attempts == [], r.stderr
  r = worker("--run=nothing")
  assert r.returncode == 2 and "is not part of the sweep" in r.stderr, r.stderr


def _wait_for(cond, timeout=120, what=""):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return
    time.sleep(0.2)
  raise AssertionError(f"timed out waiting for {what}")


def _no_overlap(attempts):
  by = {}
  for name, pid, start, end, status in attempts:
    by.setdefault(name, []).append((start, end or float("inf")))
  for name, spans in by.items():
    spans.sort()
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
      assert s2 >= e1, f"two processes trained {name} at once"


@pytest.mark.slow
def test_killed_runner_resumes_and_two_runners_share_the_work(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data, steps=150, n_pre=2, ckpt_every=5)
  w = str(tmp_path / "w")
  args = [sys.executable, "-m", "jaxreplay.cli", "sweep", spec, f"--workdir={w}"]
  p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ckpts = os.path.join(runner.run_dir(w, "pretrain/seed=0"), "checkpoints")
  _wait_for(lambda: os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)), what="a checkpoint")
  p.send_signal(signal.SIGKILL)
  p.wait()
  # The worker dies with its runner (SIGTERM → checkpoint), which releases its claim.
  _wait_for(lambda: not runner.is_locked(w, "pretrain/seed=0"), timeout=60, what="the claim to be released")
  assert not runner.is_finished(w, "pretrain/seed=0")
  # Two runners at once finish the grid; no run trains twice at the same time, each finishes once.
  procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
  outs = [q.communicate(timeout=600)[0].decode() for q in procs]
  assert all(q.returncode == 0 for q in procs), outs
  results, attempts = rows(w)
  assert len(results) == 4
  _no_overlap(attempts)
  done = [a[0] for a in attempts if a[4] == "done"]
  assert sorted(done) == sorted(results)  # every run finished exactly once
  started = [line.split()[2] for out in outs for line in out.splitlines() if " start " in line]
  assert len(started) == len(set(started)) == 4, outs  # the two runners never start the same run
  metrics = [json.loads(l) for l in open(os.path.join(runner.run_dir(w, "pretrain/seed=0"), "metrics.jsonl"))]
  assert results["pretrain/seed=0"]["step"] == 150 and metrics[-1]["final"]


def test_workdir_accepts_changes_that_keep_results(tmp_path, data):
  one = write_sweep(tmp_path / "one.py", *data)
  w = str(tmp_path / "w")
  runner.prepare(one, w)
  text = open(one).read()
  logging = tmp_path / "logging.py"
  logging.write_text(text.replace("c.log.update(every_steps=5", "c.log.update(every_steps=7"))
  runner.prepare(str(logging), w)  # logging does not change a run's numbers: accepted, recorded
  lr = tmp_path / "lr.py"
  lr.write_text(text.replace("lr=1e-2", "lr=2e-2"))
  with pytest.raises(SweepError, match=r"4 runs changed, e.g. 'pretrain/seed=0' \(optim.lr differ\)"):
    runner.prepare(str(lr), w)


def test_device_slots_split_accelerators_over_jobs():
  assert runner.device_slots("0,1,2,3", 2) == ["0,1", "2,3"]
  assert runner.device_slots("", 4) == []
  with pytest.raises(SweepError, match="--devices=0,1,2 lists 3 devices, which --jobs=2 does not divide"):
    runner.device_slots("0,1,2", 2)
