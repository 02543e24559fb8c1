"""Working paths of `jaxreplay sweep` and `jaxreplay report`, each through the real CLI with its result asserted:
every `--status` state; `--devices`/`--device_env` giving each worker its own device; `--extend` training only the
added runs; and `report` on a real small sweep, its matched-loss numbers worked out again from metrics.jsonl."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jaxreplay.experiments import runner, sweepdir

from helpers import token_dir
from test_sweeps import shared_compile_cache, write_sweep  # noqa: F401 (a module fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return token_dir(root / "a", dataset_id=0, seed=0, step=3), token_dir(root / "b", dataset_id=1, seed=1, step=5)


def cli(*args, env=None, check=True):
  r = subprocess.run([sys.executable, "-m", "jaxreplay.cli", *args], cwd=ROOT, capture_output=True, text=True,
                     env=env, timeout=900)
  assert r.returncode == 0 or not check, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def test_status_names_every_state(tmp_path, data):
  """One run in each state, made with the runner's own records: a result, a held claim, a failed last attempt,
  checkpoints without a result, nothing yet; a failed run that was tried again and is now running shows running."""
  spec = write_sweep(tmp_path / "s.py", *data, n_pre=3)  # 3 pretrain runs, a finetune after each
  w = str(tmp_path / "w")
  runs, fp = runner.prepare(spec, w)
  names = [r.name for r in runs]
  assert names[:3] == ["pretrain/seed=0", "pretrain/seed=1", "pretrain/seed=2"]
  done, failed, partial, pending = names[0], names[1], names[2], names[3]
  os.makedirs(sweepdir.run_dir(w, done), exist_ok=True)
  with open(os.path.join(sweepdir.run_dir(w, done), "final.json"), "w") as f:
    json.dump(dict(valid_ntp=2.5, stop_reason="steps", tokens=2560), f)
  db = sweepdir.connect(w)
  sweepdir.end_attempt(db, sweepdir.start_attempt(db, failed), "failed", "boom")
  sweepdir.end_attempt(db, sweepdir.start_attempt(db, names[4]), "failed", "boom")  # failed, then claimed again
  db.close()
  os.makedirs(os.path.join(sweepdir.run_dir(w, partial), "checkpoints", "4"))
  claim = sweepdir.Claim(w, names[4])
  assert claim
  try:
    out = cli("sweep", spec, f"--workdir={w}", "--status").stdout.strip().splitlines()
  finally:
    claim.close()
  states = {line.split()[0]: line.split()[1] for line in out[1:-1]}
  assert states == {done: "done", failed: "failed", partial: "partial", pending: "pending", names[4]: "running",
                    names[5]: "pending"}
  assert out[-1] == "1 done, 1 failed, 1 partial, 2 pending, 1 running of 6 runs"
  assert "2.5000" in next(l for l in out if l.startswith(done))  # the result's loss


SITE = textwrap.dedent("""
    import json, os
    if os.environ.get("SWEEP_PATHS_LOG") and "JAXREPLAY_LOCK_FDS" in os.environ:  # a worker
      with open(os.environ["SWEEP_PATHS_LOG"], "a") as f:
        f.write(json.dumps(dict(pid=os.getpid(), device=os.environ.get("SWEEP_PATHS_DEVICE"))) + "\\n")
""")

SWEEP = textwrap.dedent("""
    from jaxreplay import config
    from jaxreplay.experiments import sweeps

    def tiny(data, steps):
      c = config.default()
      c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
      c.data.path = data
      c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=256)
      c.eval.update(every_steps=2, tokens=256, batch_size=8)
      c.checkpoint.update(every_steps=100, every_minutes=0.0, async_save=False)
      c.log.update(every_steps=2, progress=False)
      c.stop.steps = steps
      return c

    def get_sweep(arg=""):
      s = sweeps.Sweep()
      s.stage("pretrain", tiny({a!r}, 8), {{"seed": [0]}})
      ft = tiny({b!r}, 6)
      ft.replay.update(source="real", coeff=3.0)
      ft.optim.lr = 3e-2
      s.stage("finetune", ft, {{"replay.method": ["none", "kl"] + (["ntp"] if arg == "more" else [])}}, after="pretrain")
      return s
""")


def hand_matched(workdir, finetunes, before):
  """The matched-loss table worked out again from each run's metrics.jsonl: the highest of the runs' lowest
  evaluated downstream losses; each run's previous loss where its downstream loss first gets there."""
  trajs = {}
  for name in finetunes:
    rows = [json.loads(l) for l in open(os.path.join(sweepdir.run_dir(workdir, name), "metrics.jsonl"))]
    trajs[name] = [(r["valid_ntp"], r["prev_ntp"]) for r in rows if "prev_ntp" in r and not r.get("final")]
    assert len(trajs[name]) == 4, trajs[name]  # evaluations at steps 0, 2, 4, 6
  target = max(min(x for x, _ in t) for t in trajs.values())
  out = {}
  for name, t in trajs.items():
    i = next(i for i, (x, _) in enumerate(t) if x <= target)
    if i == 0:
      y = t[0][1]
    else:
      (x0, y0), (x1, y1) = t[i - 1], t[i]
      y = y0 + (x0 - target) / (x0 - x1) * (y1 - y0)
    out[name] = dict(matched=target, prev=y, rise=y - before)
  return out


def test_devices_extend_and_report_on_a_real_sweep(tmp_path, data):
  spec = tmp_path / "s.py"
  spec.write_text(SWEEP.format(a=data[0], b=data[1]))
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(SITE)  # each worker process records the device it was given
  log = tmp_path / "workers.jsonl"
  env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', ROOT)}",
             SWEEP_PATHS_LOG=str(log))
  w = str(tmp_path / "w")
  out = cli("sweep", str(spec), f"--workdir={w}", "--jobs=2", "--devices=3,5", "--device_env=SWEEP_PATHS_DEVICE",
            env=env).stdout

  # --devices: every worker saw exactly the slot the runner says it gave it; the two finetunes ran side by side
  starts = {int(m[1]): (m[0], m[2]) for m in re.findall(r"start\s+(\S+) \(pid (\d+), devices (\S+)\)", out)}
  workers = [json.loads(l) for l in open(log)]
  assert len(starts) == len(workers) == 3, (out, workers)
  assert all(w_["device"] == starts[w_["pid"]][1] and w_["device"] in ("3", "5") for w_ in workers)
  ft_devices = {d for name, d in starts.values() if name.startswith("finetune/")}
  assert ft_devices == {"3", "5"}  # two jobs at once: one device each, never the same

  # --extend: the added run alone trains; the finished ones are not touched
  runs, _ = runner.load_runs(w)
  mtimes = {r.name: os.path.getmtime(os.path.join(sweepdir.run_dir(w, r.name), "final.json")) for r in runs}
  log.unlink()
  more = cli("sweep", f"{spec}:more", f"--workdir={w}", "--extend", env=env).stdout
  started = re.findall(r"start\s+(\S+) \(pid", more)
  assert started == ["finetune/pretrain/seed=0/method=ntp"], more
  assert len(open(log).read().splitlines()) == 1
  for name, t in mtimes.items():
    assert os.path.getmtime(os.path.join(sweepdir.run_dir(w, name), "final.json")) == t, name
  status = cli("sweep", f"{spec}:more", f"--workdir={w}", "--status").stdout.strip().splitlines()
  assert status[-1] == "4 done of 4 runs"

  # report: matched.md against the hand computation
  cli("report", w, f"--out={tmp_path / 'report'}")
  before = json.load(open(os.path.join(sweepdir.run_dir(w, "pretrain/seed=0"), "final.json")))["valid_ntp"]
  fts = [f"finetune/pretrain/seed=0/method={m}" for m in ("none", "kl", "ntp")]
  want = hand_matched(w, fts, before)
  table = (tmp_path / "report" / "matched.md").read_text().splitlines()
  head = [c.strip() for c in table[0].strip("|").split("|")]
  got = {}
  for line in table[2:]:
    cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
    got[cells["run"]] = cells
  assert sorted(got) == sorted(fts)
  base_rise = want[fts[0]]["rise"]
  for name in fts:
    assert float(got[name]["matched downstream loss"]) == pytest.approx(want[name]["matched"], abs=6e-4)
    assert float(got[name]["previous loss there"]) == pytest.approx(want[name]["prev"], abs=6e-4)
    assert float(got[name]["forgetting"]) == pytest.approx(want[name]["rise"], abs=6e-4)
    assert float(got[name]["previous loss before"]) == pytest.approx(before, abs=6e-4)
    if name != fts[0] and abs(base_rise) > 1e-3:
      cut = 1 - want[name]["rise"] / base_rise
      assert got[name]["forgetting cut"] == f"{cut:.0%}"
  assert want[fts[0]]["rise"] > 0  # finetuning on b did make the model forget a: the numbers compared matter
