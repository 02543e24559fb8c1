"""The trainer on chat data with real replay rows and with the next-token replay loss (on the tiny Llama)."""
import json
import lzma
import os

import pytest

from jaxreplay.train import loop as train

from test_train_chat import _write_data, checkpoint, tiny_config  # noqa: F401 (a module fixture)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _real_text(tmp_path):
  path = tmp_path / "replay.jsonl"
  with lzma.open(os.path.join(FIXTURES, "genesis_en_kjv.txt.xz"), "rt") as f:
    verses = f.read().splitlines()[:200]
  path.write_text("".join(json.dumps({"text": " ".join(verses[i:i + 5])}) + "\n" for i in range(0, 200, 5)))
  return str(path)


def _regs(workdir, coeff=1.0):
  """{step: train_reg}, having checked that each step's loss is its next-token loss plus coeff × the regulariser."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if "train_reg" in r and not r.get("final")]
  for r in rows:
    assert r["train_loss"] == pytest.approx(r["train_ntp"] + coeff * r["train_reg"], rel=1e-5, abs=1e-6), r
  return {r["step"]: r["train_reg"] for r in rows}


@pytest.mark.parametrize("method", ["kl", "ntp"])
def test_real_replay_rows_regularise_with_kl_and_ntp(checkpoint, tmp_path, method):  # noqa: F811
  directory, _, _ = checkpoint
  _write_data(tmp_path)
  c = tiny_config(directory, tmp_path, method=method, source="real", coeff=1.0)
  c.replay.path = _real_text(tmp_path)
  c.stop.steps = 6
  result = train.run(c, str(tmp_path / "run"))
  regs = _regs(tmp_path / "run")
  assert sorted(regs) == list(range(1, 7)) and result["train_step_compiles"] == 1
  if method == "kl":  # the trained copy starts equal to the frozen model, then moves away on the chats
    assert abs(regs[1]) < 1e-5 and regs[6] > 1e-4
  else:  # a next-token loss on English text: far above 0 for the random tiny model, and it learns it
    assert regs[1] > 1.0 and regs[6] < regs[1]
