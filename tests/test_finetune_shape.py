"""`jaxreplay finetune --config.init.from=DIR` takes the model shape of the run in DIR (through the real CLI)."""
import json
import os
import subprocess
import sys

from jaxreplay import config as config_lib
from jaxreplay.train import loop as train

from helpers import tiny_config, token_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inherit_model_shape_takes_every_weight_key_and_reports_contradictions():
  c = config_lib.default()
  parent = config_lib.default().to_dict()
  parent["model"].update(d_model=96, n_layers=3, head_dim=32, vocab_size=512, mlp_ratio=2, rope_base=500.0,
                         seq_len=64, remat=True, some_future_key=7)
  assert config_lib.inherit_model_shape(c, parent, explicit=("seq_len",)) == []
  m = c.model
  assert (m.d_model, m.n_layers, m.head_dim, m.vocab_size, m.mlp_ratio, m.rope_base) == (96, 3, 32, 512, 2, 500.0)
  assert m.seq_len == 256 and m.remat is False  # how the run computes stays the child's
  c2 = config_lib.default()
  c2.model.d_model = 128
  assert config_lib.inherit_model_shape(c2, parent, explicit=("d_model",)) == ["d_model"]


def test_cli_finetune_takes_the_parents_shape_unless_contradicted(tmp_path):
  a, b = token_dir(tmp_path / "a", dataset_id=0), token_dir(tmp_path / "b", dataset_id=1, seed=1)
  pre = tiny_config(a, steps=4)
  pre.model.d_model = 48  # neither the quickstart file's 128 nor the default
  train.run(pre, str(tmp_path / "pre"))
  base = [sys.executable, "-m", "jaxreplay.cli", "finetune", "--config=sweeps/quickstart.py:finetune",
          f"--config.data.path={b}", f"--config.init.from={tmp_path / 'pre'}", "--config.model.seq_len=16",
          "--config.optim.batch_size=8", "--config.optim.warmup_tokens=64", "--config.stop.tokens=512",
          "--config.eval.tokens=512", "--config.eval.every_tokens=512", "--config.eval.batch_size=8",
          "--config.log.progress=false", "--config.checkpoint.async_save=false"]
  r = subprocess.run(base + ["--config.model.d_model=64", f"--workdir={tmp_path / 'bad'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().count("\n") == 0 and "config.model.d_model=64 differs from the run in init.from (48)" \
      in r.stderr
  assert not os.path.exists(tmp_path / "bad" / "config.json")
  r = subprocess.run(base + [f"--workdir={tmp_path / 'ft'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  with open(tmp_path / "ft" / "config.json") as f:
    model = json.load(f)["model"]
  assert (model["d_model"], model["n_layers"], model["head_dim"], model["vocab_size"]) == (48, 2, 16, 64)
