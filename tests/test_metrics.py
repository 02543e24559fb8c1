"""The metric writers with the real libraries: JSON lines, TensorBoard event files, a W&B offline run."""

import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxreplay.io import read_metrics
from jaxreplay.train import metrics


def log_cfg(**kw):
  base = dict(every_steps=1, progress=False, tensorboard=False, wandb=False, wandb_project="jaxreplay-test")
  return ml_collections.ConfigDict({**base, **kw})


ROWS = [(10, dict(loss=2.5, lr=1e-3, note="text")), (20, dict(loss=2.0, lr=5e-4)), (30, dict(loss=1.75, lr=2.5e-4))]


def write_all(workdir, cfg, config_dict=None):
  w = metrics.MetricWriter(str(workdir), cfg, config_dict)
  for step, row in ROWS:
    w.write(step, row)
  w.close()


def test_json_lines_and_truncation_on_resume(tmp_path):
  write_all(tmp_path, log_cfg())
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [10, 20, 30]
  metrics.MetricWriter(str(tmp_path), log_cfg(), resume_step=20).close()  # a resume from step 20
  assert [r["loss"] for r in read_metrics(str(tmp_path))] == [2.5, 2.0]


def test_tensorboard_event_files_read_back_with_event_accumulator(tmp_path):
  write_all(tmp_path, log_cfg(tensorboard=True))
  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"loss", "lr"}  # strings are not scalars; step is the x axis
  loss = acc.Scalars("loss")
  assert [e.step for e in loss] == [10, 20, 30]
  assert [e.value for e in loss] == pytest.approx([2.5, 2.0, 1.75])
  assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-3, 5e-4, 2.5e-4])


def wandb_records(run_file):
  """Every record of a W&B transaction log (the .wandb file an offline run writes and `wandb sync` uploads),
  read back by W&B's own reader."""
  out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_file], check=True,
                       capture_output=True, text=True, timeout=120).stdout
  return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_run_holds_the_logged_history(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  write_all(tmp_path / "run", log_cfg(wandb=True), config_dict=dict(optim=dict(lr=1e-3)))
  run_files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(run_files) == 1
  records = wandb_records(run_files[0])
  history = [r["history"]["item"] for r in records if r["type"] == "history"]
  logged = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
  assert logged == [dict(step=s, **r) for s, r in ROWS]
  assert [h["_step"] for h in history] == [10, 20, 30]  # W&B's own step axis is the training step
  run = next(r["run"] for r in records if r["type"] == "run")
  assert run["config"]["update"]["optim"] == dict(lr=1e-3) and run["project"] == "jaxreplay-test"
  assert run["display_name"] == "run"  # named after the workdir
