"""The quickstart's table: forgetting at the matched Spanish loss, from the runs' logged evaluations."""

import json

import pytest

from jaxreplay import quickstart


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
  rows = {r["run"]: r for r in quickstart.matched_table(str(tmp_path / "pre"),
                                                        {"finetune_none": str(tmp_path / "none"),
                                                         "finetune_kl": str(tmp_path / "kl")})}
  assert rows["finetune_none"]["matched_downstream"] == rows["finetune_kl"]["matched_downstream"] == 2.5
  # none at Spanish 2.5: halfway between (3.0, 3.4) and (2.0, 3.8) → English 3.6, a rise of 0.6; kl: 3.2, 0.2
  assert rows["finetune_none"]["prev_at_matched"] == pytest.approx(3.6)
  assert rows["finetune_kl"]["rise"] == pytest.approx(0.2)
  assert rows["finetune_kl"]["cut"] == pytest.approx(1 - 0.2 / 0.6)
  assert rows["finetune_kl"]["downstream"] == 2.5 and "cut" in rows["finetune_none"]
  text = quickstart.format_matched(list(rows.values()))
  assert "matched Spanish loss" in text and "| finetune_kl" in text and "67%" in text
