"""The quickstart: its table compares forgetting at the matched Spanish loss, --scale shrinks every stage, and a
second call on a finished quickstart trains nothing and prints the same table."""

import json
import os
import textwrap

import pytest

from jaxreplay.experiments import quickstart, report

from helpers import token_dir


def write_run(d, final, evals):
  d.mkdir()
  (d / "final.json").write_text(json.dumps(final))
  lines = [dict(step=i, valid_ntp=x, prev_ntp=y) for i, (x, y) in enumerate(evals)]
  lines.append(dict(step=len(evals), final=True, valid_ntp=0.0, prev_ntp=99.0))  # the final line is not an eval
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_forgetting_is_compared_where_both_finetunes_reached_the_same_spanish_loss(tmp_path):
  write_run(tmp_path / "pre", dict(valid_ntp=3.0), [])
  # Without replay Spanish goes 5 → 3 → 2 with English 3.0 → 3.4 → 3.8; with KL replay Spanish only reaches 2.5.
  write_run(tmp_path / "none", dict(valid_ntp=2.0, compute_multiplier=1.0), [(5.0, 3.0), (3.0, 3.4), (2.0, 3.8)])
  write_run(tmp_path / "kl", dict(valid_ntp=2.5, compute_multiplier=1.5), [(5.0, 3.0), (4.0, 3.05), (2.5, 3.2)])
  rows = {r["run"]: r for r in report.matched_table(str(tmp_path / "pre"),
                                                    {"finetune_none": str(tmp_path / "none"),
                                                     "finetune_kl": str(tmp_path / "kl")})}
  assert rows["finetune_none"]["matched_downstream"] == rows["finetune_kl"]["matched_downstream"] == 2.5
  # none at Spanish 2.5: halfway between (3.0, 3.4) and (2.0, 3.8) → English 3.6, a rise of 0.6; kl: 3.2, 0.2
  assert rows["finetune_none"]["prev_at_matched"] == pytest.approx(3.6)
  assert rows["finetune_kl"]["rise"] == pytest.approx(0.2)
  assert rows["finetune_kl"]["cut"] == pytest.approx(1 - 0.2 / 0.6)
  assert rows["finetune_kl"]["downstream"] == 2.5 and "cut" in rows["finetune_none"]
  text = report.format_matched(list(rows.values()), "English", "Spanish")
  assert "matched Spanish loss" in text and "| finetune_kl" in text and "67%" in text

def test_quickstart_scales_its_stages_and_a_second_call_trains_nothing(tmp_path, capsys):
  a, b = token_dir(tmp_path / "a", dataset_id=0, seed=0, step=3), token_dir(tmp_path / "b", dataset_id=1, seed=1, step=5)
  exp = tmp_path / "exp.py"
  exp.write_text(textwrap.dedent(f"""
      from jaxreplay import config as config_lib
      def get_config(arg):
        c = config_lib.default()
        c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=16, vocab_size=64)
        c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=256)
        c.eval.update(every_tokens=1280, tokens=1024, batch_size=8)
        c.checkpoint.update(every_steps=10, every_minutes=0.0, async_save=False)
        c.log.update(every_steps=5, progress=False)
        c.data.path = {a!r} if arg == "pretrain" else {b!r}
        c.stop.tokens = 40 * 128  # 40 steps of 8 x 16 tokens
        if arg != "pretrain":
          c.stage = "finetune"
        if arg == "finetune_kl":
          c.replay.update(method="kl", source="self", coeff=1.0, batch_size=8, buffer=2)
        return c
      """))
  workdir = str(tmp_path / "qs")
  argv = ["jaxreplay quickstart", f"--workdir={workdir}", f"--config={exp}", "--scale=0.5"]
  assert quickstart.main(argv) == 0
  first = capsys.readouterr().out
  runs = ("pretrain", "finetune_none", "finetune_kl_self")
  for name in runs:
    with open(os.path.join(workdir, name, "final.json")) as f:
      final = json.load(f)
    assert final["step"] == 20 and final["tokens"] == 20 * 128, name  # half of 40 steps
  with open(os.path.join(workdir, "quickstart.json")) as f:
    table = json.load(f)
  assert [r["run"] for r in table] == ["finetune_none", "finetune_kl_self"]
  mtimes = {n: os.path.getmtime(os.path.join(workdir, n, "final.json")) for n in runs}
  assert quickstart.main(argv) == 0  # finished: no run trains again, the same table is printed
  again = capsys.readouterr().out
  assert {n: os.path.getmtime(os.path.join(workdir, n, "final.json")) for n in runs} == mtimes
  table_lines = lambda out: [line for line in out.splitlines() if "finetune_" in line and "==" not in line]
  assert table_lines(again) == table_lines(first) and table_lines(first)
