"""Grouping runs into packs (experiments/packing.py) and packed sweeps through the real CLI (pack_runner.py)."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxreplay import config as config_lib
from jaxreplay.errors import UsageError
from jaxreplay.experiments import packing, pack_runner, runner, sweepdir
from jaxreplay.models import decoder, export as export_lib

from helpers import tiny_config, token_dir
import test_sweeps as sweeps_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return token_dir(root / "a", dataset_id=0, seed=0, step=3), token_dir(root / "b", dataset_id=1, seed=1, step=5)


def ft(data_b, method="kl", **kw):
  c = tiny_config(data_b, steps=10)
  c.init["from"] = "/somewhere/pre"
  c.replay.update(method=method, source="real")
  for k, v in kw.items():
    c[k.split(".")[0]][k.split(".")[1]] = v
  return c


def test_runs_that_differ_in_packable_values_pack_and_program_changes_split(data):
  a, b = data
  configs = {f"lr{i}": ft(b, **{"optim.lr": lr, "replay.coeff": cf}) for i, (lr, cf) in
             enumerate([(1e-3, 0.1), (3e-3, 1.0), (1e-2, 10.0)])}
  configs["none"] = ft(b, method="none")  # another program: never with the kl runs
  configs["wide"] = ft(b, **{"model.d_model": 64})  # another shape
  configs["lora"] = ft(b, **{"lora.rank": 4})  # cannot pack
  configs["none2"] = ft(b, method="none", **{"optim.lr": 5e-3})
  packs = packing.group(configs, n=4)
  assert packs == [["lr0", "lr1", "lr2"], ["none", "none2"], ["wide"], ["lora"]]
  assert packing.why_alone(configs["lora"]) == "LoRA"
  assert packing.group(configs, n=2)[0] == ["lr0", "lr1"]
  assert all(len(p) == 1 for p in packing.group(configs, n=1))
  with pytest.raises(UsageError):
    packing.group(configs, n=0)


def test_lengths_group_so_idle_member_steps_stay_under_the_share(data):
  a, _ = data
  lengths = [1000, 950, 900, 500, 480, 100, 64, 16]
  configs = {f"r{n}": tiny_config(a, steps=n) for n in lengths}
  packs = packing.group(configs, n=8, max_idle=0.25)
  for p in packs:
    assert packing.idle_share([packing.length(configs[x]) for x in p]) <= 0.25
  # [1000..480]: idle (0+50+100+500+520)/5000 = 0.234; with r100 it would pass 0.25.
  assert packs == [["r1000", "r950", "r900", "r500", "r480"], ["r100", "r64"], ["r16"]]
  assert sorted(x for p in packs for x in p) == sorted(configs)
  assert packing.planned_share(packs, configs) == pytest.approx((1170 + 36) / (5000 + 200 + 16))
  tpp = tiny_config(a, tokens_per_param=2.0)  # lengths as loop.Stage computes them
  counts = decoder.param_counts(decoder.ModelConfig.from_config(tpp.model))
  assert packing.length(tpp) == round(2.0 * counts[tpp.model.param_count] / config_lib.tokens_per_step(tpp))


def test_chains_hold_at_most_n_runs():
  assert packing.chains(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
  assert packing.chains(["a", "b"], 1) == [["a"], ["b"]]


def write_sweep(path, data_a, data_b):
  """Three pretraining seeds and a real-data KL finetune after each, packed by 3 by default."""
  return sweeps_test.write_sweep(path, data_a, data_b, steps=12, n_pre=3, ckpt_every=4, log_every=4, pack=3,
                                 ft_steps=8, kl_coeffs=(0.5,))


def cli(*args):
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=900)


def test_pack_value_below_one_is_one_clear_error(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data)
  for bad in ("0", "-2"):
    r = cli(spec, f"--workdir={tmp_path}/w", f"--pack={bad}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"--pack={bad} must be ≥ 1" in r.stderr


def test_packed_sweep_writes_every_run_dir_and_restarts_with_nothing_to_do(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data)  # the sweep file's default: pack=3
  w = str(tmp_path / "w")
  r = cli(spec, f"--workdir={w}")
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.count("start  pack of 3") == 2, r.stdout  # the pretraining stage, then the finetuning one
  res, att = sweeps_test.rows(w)
  assert len(res) == 6 and sorted(a[-1] for a in att) == ["done"] * 6
  for name, m in res.items():
    d = runner.run_dir(w, name)
    for f in ("final.json", "metrics.jsonl", "config.json", "export", "pack.json"):
      assert os.path.exists(os.path.join(d, f)), (name, f)
    assert m["pack_members"] == 3 and m["step"] == (12 if name.startswith("pretrain") else 8)
  assert "prev_ntp" in res["finetune/pretrain/seed=1/coeff=0.5"]
  r = cli(spec, f"--workdir={w}")
  assert r.returncode == 0 and "start" not in r.stdout and "6/6 runs finished" in r.stdout
  status = cli(spec, f"--workdir={w}", "--status").stdout
  assert "6 done of 6 runs" in status


def test_restart_with_pack_one_is_refused_while_a_pack_is_unfinished(tmp_path, data):
  spec = write_sweep(tmp_path / "s.py", *data)
  w = str(tmp_path / "w")
  runs, _ = runner.prepare(spec, w)
  names = [r.name for r in runs if r.stage == "pretrain"]
  for n in names:  # what an interrupted pack leaves behind
    os.makedirs(runner.run_dir(w, n), exist_ok=True)
    with open(os.path.join(runner.run_dir(w, n), pack_runner.MARKER), "w") as f:
      json.dump(dict(members=names, pack=3), f)
  r = cli(spec, f"--workdir={w}", "--pack=1")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
  assert "was interrupted inside a pack of 3 runs" in r.stderr and "--pack=3" in r.stderr


def test_a_pack_that_waits_for_its_parents_closes_the_results_table(tmp_path, data, monkeypatch):
  spec = write_sweep(tmp_path / "s.py", *data)
  w = str(tmp_path / "w")
  runs, _ = runner.prepare(spec, w)
  opened = []
  def connect(workdir):
    opened.append(sweepdir.connect(workdir))
    return opened[-1]
  monkeypatch.setattr(pack_runner, "connect", connect)
  names = [r.name for r in runs if r.stage == "finetune"]
  assert pack_runner.main(["--workdir", w, "--runs", json.dumps(names), "--kind", "pack"]) == 4
  for db in opened:
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
      db.execute("SELECT 1")


PACK_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from jaxreplay.train import pack
configs = []
for seed, steps in ((0, 40), (1, 30)):
  c = tiny_config({data!r}, steps=steps)
  c.seed = seed
  c.checkpoint.update(every_steps=3)
  configs.append(c)
pack.run_pack(configs, [sys.argv[1] + "/m0", sys.argv[1] + "/m1"], sys.argv[1] + "/pack")
"""


def _pack_process(script, where):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, script, where], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def _exported(d):
  return [np.asarray(x) for x in jax.tree.leaves(export_lib.load_exported(d))]


def test_killed_or_preempted_pack_resumes_to_the_uninterrupted_pack(tmp_path, data):
  script = tmp_path / "pack.py"
  script.write_text(PACK_SCRIPT.format(tests=os.path.join(ROOT, "tests"), data=data[0]))
  ref = str(tmp_path / "ref")
  assert _pack_process(str(script), ref).wait(timeout=600) == 0
  kill_at = random.Random(15).randrange(4, 25)
  for sig in (signal.SIGKILL, signal.SIGTERM):
    where = str(tmp_path / sig.name)
    p = _pack_process(str(script), where)
    ckpts = os.path.join(where, "pack", "checkpoints")
    end = time.time() + 300
    while time.time() < end and not (os.path.isdir(ckpts) and any(
        d.isdigit() and int(d) >= kill_at for d in os.listdir(ckpts))):
      time.sleep(0.05)
    p.send_signal(sig)
    out = p.communicate(timeout=300)[0].decode()
    if sig == signal.SIGTERM:
      assert p.returncode == 1 and "Preempted (SIGTERM)" in out, out
    assert not os.path.exists(os.path.join(where, "m0", "final.json"))
    assert _pack_process(str(script), where).wait(timeout=600) == 0
    for m in ("m0", "m1"):
      for x, y in zip(_exported(os.path.join(ref, m)), _exported(os.path.join(where, m))):
        np.testing.assert_array_equal(x, y)
      with open(os.path.join(ref, m, "final.json")) as f, open(os.path.join(where, m, "final.json")) as g:
        a, b = json.load(f), json.load(g)
      assert a["valid_ntp"] == b["valid_ntp"] and a["step"] == b["step"]
