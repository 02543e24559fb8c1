"""Instruct runs (a Hugging Face model on chat data) in the generic sweep machinery: the one validation at
expansion, `jaxreplay sweep` end to end through train.run, report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxreplay import config as config_lib
from jaxreplay.experiments import report
from jaxreplay.experiments import results_table
from jaxreplay.experiments import sweepdir
from jaxreplay.experiments import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "sweeps", "instruct.py") + ":small"


def base():
  c = config_lib.default()
  c.stage = "finetune"
  c.model.path, c.data.kind, c.data.train = "model", "chat", "chat.jsonl"  # validation reads no files
  c.stop.epochs = 1.0
  return c


def test_instruct_stages_expand_with_the_one_validation():
  s = sweeps.Sweep()
  s.stage("instruct", base(), {"replay.method": ["none", "kl"], "stop.steps": [3]})
  runs = sweeps.expand(s)
  assert [r.name for r in runs] == ["instruct/method=none,steps=3", "instruct/method=kl,steps=3"]
  # A grid over stop.steps replaces the base's epochs (validate wants exactly one of them).
  stop = runs[0].config["stop"]
  assert stop["epochs"] == 0.0 and stop["steps"] == 3 and runs[0].config["stage"] == "finetune"
  s = sweeps.Sweep()
  s.stage("instruct", base(), {"replay.method": ["kl"], "train.microbatches": [3]})
  with pytest.raises(config_lib.ConfigError, match=r"Run 'instruct/method=kl,microbatches=3': "
                                                   "config.train.microbatches=3 does not divide"):
    sweeps.expand(s)
  s = sweeps.Sweep()
  s.stage("instruct", base(), {"replay.method": ["sideways"]})
  with pytest.raises(config_lib.ConfigError, match="config.replay.method='sideways'"):
    sweeps.expand(s)
  s = sweeps.Sweep()
  first = s.stage("a", base())
  s.stage("b", base(), after=first)
  with pytest.raises(sweeps.SweepError, match="finetunes the Hugging Face checkpoint in config.model.path"):
    sweeps.expand(s)


def sweep_cli(cwd, *args):
  # Workers share compiled steps with every test session (as in test_sweeps.py): compiling dominates tiny runs.
  cache = os.environ.get("JAXREPLAY_TEST_JAX_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "jaxreplay", "jax_cache_tests"))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", *args], capture_output=True, text=True,
                        cwd=cwd, env=env)


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  """The directory sweeps run from: sweeps/instruct.py:small builds its tiny checkpoint under ./runs there."""
  pytest.importorskip("torch", reason="the tiny Llama checkpoint is made with torch (pip install torch)")
  pytest.importorskip("transformers", reason="checkpoints and chat templates need transformers")
  return tmp_path_factory.mktemp("instruct_sweep")


def test_small_sweep_dry_run_lists_every_arm(cwd):
  r = sweep_cli(cwd, SMALL, "--workdir=w_small", "--dry-run")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  names = [line.split()[0] for line in lines[2:]]
  assert lines[0] == "13 runs in dependency order (13 instruct):" and names[0] == "instruct/method=none"
  assert "instruct/method=kl,src=self,coeff=1" in names and len(names) == 13
  assert not os.path.exists(cwd / "w_small")  # a dry run writes nothing


def test_instruct_sweep_runs_records_skips_finished_and_reports(cwd):
  """The KL self-replay arm of the :small setup, 2 steps, through `jaxreplay sweep`; run again: nothing to train."""
  spec = cwd / "tiny.py"
  spec.write_text(textwrap.dedent(f"""
      from jaxreplay.experiments import sweeps

      def get_sweep(arg=""):
        c = sweeps.load({SMALL!r}).stages[0].base
        c.stop.steps = 2
        c.eval.update(every_steps=2, at_start=False)
        s = sweeps.Sweep("one instruct arm")
        s.stage("instruct", c, [{{"replay.method": "kl", "replay.source": "self"}}])
        return s
      """))
  name, w = "instruct/method=kl,src=self", str(cwd / "w")
  r = sweep_cli(cwd, str(spec), "--workdir=w")
  assert r.returncode == 0 and f"start  {name}" in r.stdout, r.stdout + r.stderr
  [row] = results_table.Results(w).rows
  m = row["metrics"]
  assert row["name"] == name and row["stage"] == "instruct" and row["config"]["replay"]["method"] == "kl"
  assert row["config"]["data"]["kind"] == "chat"
  assert m == json.load(open(os.path.join(sweepdir.run_dir(w, name), "final.json")))
  assert m["step"] == 2 and m["train_step_compiles"] == 1 and m["self_kl"] > 0 and "mcq_toy" in m
  # Everything is done: the same command trains nothing; report reads the table.
  r = sweep_cli(cwd, str(spec), "--workdir=w")
  assert r.returncode == 0 and "start" not in r.stdout and "1/1 runs finished" in r.stdout, r.stdout + r.stderr
  written = report.report(w, str(cwd / "report"))
  assert [os.path.basename(p) for p in written] == ["results.csv", "results.md"]
  table = open(cwd / "report" / "results.md").read()
  assert name in table and "self_kl" in table and "mcq_toy" in table
