"""`jaxreplay pretrain` → `finetune` through the real CLI with the workdir, data, exports and replay cache all
on gs:// (a loopback GCS server): the same numbers as on a local disk, resumable after SIGKILL, and the errors
a user can cause as one sentence with exit 2."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import helpers
from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"elapsed_s", "tokens_per_s", "mfu"}  # wall-clock numbers: differ between any two runs

CONFIG = textwrap.dedent("""
    from jaxreplay import config as config_lib
    def get_config(arg=""):
      c = config_lib.default()
      c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
      c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=640)
      c.eval.update(every_tokens=1280, tokens=256, batch_size=8)
      c.checkpoint.update(every_steps=5, keep_last=2)
      c.log.update(every_steps=1, progress=False)
      c.stop.steps = 20
      c.data.path = {root!r} + "/data/a"
      if arg == "ft":
        c.data.path = {root!r} + "/data/b"
        c.replay.update(method="kl", source="self", coeff=1.0, buffer=2, cache_dir={root!r} + "/replay_cache")
      return c
""")


def _setup(root: str, tmp_path) -> str:
  """Token dirs A and B under ROOT (a bucket URL or a local directory); returns the experiment file."""
  for name, dataset_id in (("a", 0), ("b", 1)):
    local = str(tmp_path / "tokens" / name)
    helpers.token_dir(local, vocab_size=64, train_tokens=20_000, valid_tokens=4_000, dataset_id=dataset_id,
                      seed=dataset_id)
    if io.is_url(root):
      io.upload_dir(local, f"{root}/data/{name}", last="meta.json")
    else:
      os.makedirs(f"{root}/data", exist_ok=True)
      os.replace(local, f"{root}/data/{name}")
  cfg = tmp_path / f"cfg_{abs(hash(root))}.py"
  cfg.write_text(CONFIG.format(root=root))
  return str(cfg)


def _cli(args, tmp_path, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT, JAXREPLAY_CACHE=str(tmp_path / "cache"))
  return subprocess.Popen([sys.executable, "-m", "jaxreplay.cli", *args], env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(args, tmp_path):
  p = _cli(args, tmp_path)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  return out


def _final(workdir):
  return {k: v for k, v in io.read_json(f"{workdir}/final.json").items() if k not in TIMING_KEYS}


def _pretrain_then_finetune(root, cfg, tmp_path):
  _run(["pretrain", f"--config={cfg}", f"--workdir={root}/runs/pre"], tmp_path)
  _run(["finetune", f"--config={cfg}:ft", f"--config.init.from={root}/runs/pre", f"--workdir={root}/runs/ft"],
       tmp_path)
  return _final(f"{root}/runs/pre"), _final(f"{root}/runs/ft")


@pytest.mark.slow
def test_pretrain_then_finetune_on_a_bucket_equals_the_local_runs(gcs_bucket, tmp_path):
  remote = _pretrain_then_finetune(gcs_bucket, _setup(gcs_bucket, tmp_path / "g"), tmp_path)
  local_root = str(tmp_path / "local")
  local = _pretrain_then_finetune(local_root, _setup(local_root, tmp_path / "l"), tmp_path)
  assert remote == local
  assert remote[1]["prev_ntp_before"] == remote[0]["valid_ntp"]  # forgetting read the parent's final.json
  for run in ("pre", "ft"):
    assert {"checkpoints", "config.json", "export", "final.json", "metrics.jsonl"} <= set(
        io.listdir(f"{gcs_bucket}/runs/{run}"))
  assert io.listdir(f"{gcs_bucket}/replay_cache")  # the self-generated samples were cached in the bucket
  assert not [p for p in os.listdir(tmp_path) if p.startswith("gs:")]  # nothing written to a local ./gs:/...


@pytest.mark.slow
def test_sigkill_on_a_bucket_then_resume_equals_a_straight_run(gcs_bucket, tmp_path):
  cfg = _setup(gcs_bucket, tmp_path)
  _run(["pretrain", f"--config={cfg}", f"--workdir={gcs_bucket}/runs/straight"], tmp_path)
  workdir = f"{gcs_bucket}/runs/killed"
  for _ in range(2):  # killed twice, each time after a random number of checkpoints
    p = _cli(["pretrain", f"--config={cfg}", f"--workdir={workdir}"], tmp_path)
    target = random.choice([5, 10, 15])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
      if any(n.isdigit() and int(n) >= target for n in io.listdir(f"{workdir}/checkpoints")):
        break
      time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert not io.exists(f"{workdir}/final.json")
  _run(["pretrain", f"--config={cfg}", f"--workdir={workdir}"], tmp_path)
  assert _final(workdir) == _final(f"{gcs_bucket}/runs/straight")
  assert io.read_metrics(workdir) and [r["step"] for r in io.read_metrics(workdir) if "train_ntp" in r] == \
      [r["step"] for r in io.read_metrics(f"{gcs_bucket}/runs/straight") if "train_ntp" in r]


def test_a_workdir_in_a_missing_bucket_is_one_sentence_and_exit_2(gcs_server, tmp_path):
  cfg = _setup(str(tmp_path / "local"), tmp_path)
  p = _cli(["pretrain", f"--config={cfg}", "--workdir=gs://no-such-bucket-3/runs/x"], tmp_path)
  _, err = p.communicate(timeout=300)
  lines = [l for l in err.splitlines() if l.startswith("jaxreplay: error:")]
  assert p.returncode == 2 and lines == [
      "jaxreplay: error: The bucket gs://no-such-bucket-3 does not exist (or these credentials cannot see it): "
      "create it (gcloud storage buckets create gs://no-such-bucket-3) or fix the URL."]


def test_a_gs_workdir_without_gcsfs_names_the_extra_and_exits_2(tmp_path):
  cfg = _setup(str(tmp_path / "local"), tmp_path)
  shadow = tmp_path / "no_gcsfs" / "gcsfs"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ImportError('gcsfs is not installed')\n")  # as if it were absent
  env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'no_gcsfs'}:{ROOT}", JAXREPLAY_CACHE=str(tmp_path / "cache"))
  r = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "pretrain", f"--config={cfg}", "--workdir=gs://b/runs/x"],
                     env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  lines = [l for l in r.stderr.splitlines() if l.startswith("jaxreplay: error:")]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].endswith("is a gs:// path, which needs gcsfs: pip install 'jaxreplay[gcs]' (or pip install gcsfs).")
