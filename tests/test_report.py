"""Reports from a sweep's results table: the numbers behind each figure kind, and the files `report` writes."""
import json
import math
import os

import pytest

from jaxreplay.errors import UsageError
from jaxreplay.experiments import report, results_table
from jaxreplay.experiments import sweepdir


def add_run(workdir, name, parent=None, config=None, metrics=None, history=()):
  """One finished run as the runner leaves it: runs/NAME/{final.json, metrics.jsonl} and a results row."""
  d = sweepdir.run_dir(str(workdir), name)
  os.makedirs(d, exist_ok=True)
  metrics = dict(metrics or {})
  with open(os.path.join(d, "final.json"), "w") as f:
    json.dump(metrics, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for row in history:
      f.write(json.dumps(row) + "\n")
    f.write(json.dumps(dict(metrics, step=metrics.get("step", 0), final=True)) + "\n")
  db = sweepdir.connect(str(workdir))
  overrides = {k: v for k, v in _flat(config or {}).items()}
  db.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?)",
             (name, name.split("/")[0], parent, json.dumps(overrides), json.dumps(config or {}), json.dumps(metrics),
              0.0, 1.0, "test", "fp"))
  db.close()


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def traj(xs, ys, step=10):
  return [dict(step=i * step, valid_ntp=x, prev_ntp=y) for i, (x, y) in enumerate(zip(xs, ys))]


@pytest.fixture
def en_es(tmp_path):
  """A pretrained model and three finetunes: no replay forgets 0.4 at Spanish loss 3.0, KL 0.1, real KL 0.2."""
  w = tmp_path / "sweep"
  add_run(w, "pretrain", config=dict(seed=0), metrics=dict(valid_ntp=3.0, params_paper=1000, step=5))
  for label, method, source, rise in (("none", "none", "self", 0.4), ("kl", "kl", "self", 0.1),
                                      ("real", "kl", "real", 0.2)):
    xs = [4.0, 3.5, 3.0, 2.8] if label != "real" else [4.0, 3.4, 3.1, 2.9]  # real: only reaches 2.9
    ys = [3.0, 3.0 + rise / 2, 3.0 + rise, 3.0 + 1.5 * rise]
    add_run(w, f"finetune/pretrain/{label}", parent="pretrain",
            config=dict(seed=0, replay=dict(method=method, source=source, coeff=1.0), optim=dict(lr=1e-3)),
            metrics=dict(valid_ntp=xs[-1], prev_ntp=ys[-1], prev_ntp_before=3.0, prev_ntp_delta=ys[-1] - 3.0,
                         step=30, elapsed_s=1.0), history=traj(xs, ys))
  return w


def test_at_matched_interpolates_between_evaluations():
  t = [(4.0, 3.0), (3.0, 3.2), (2.0, 3.6)]
  assert results_table.at_matched(t, 3.5) == pytest.approx(3.1)
  assert results_table.at_matched(t, 2.5) == pytest.approx(3.4)
  assert results_table.at_matched(t, 1.0) is None  # never reached
  assert results_table.at_matched([(2.0, 3.0)], 2.5) == 3.0  # already below at the start


def test_matched_forgetting_compares_methods_at_equal_downstream_loss(en_es):
  res = results_table.Results(str(en_es))
  rows = {r["run"].split("/")[-1]: r for r in results_table.matched_forgetting(res)}
  assert rows["none"]["matched_downstream"] == pytest.approx(2.9)  # the loss every run reached
  # at 2.9 no-replay is halfway between 3.4 (at 3.0) and 3.6 (at 2.8): rise 0.5
  assert rows["none"]["rise"] == pytest.approx(0.5)
  assert rows["kl"]["rise"] == pytest.approx(0.125)
  assert rows["kl"]["cut"] == pytest.approx(0.75)
  assert rows["real"]["rise"] == pytest.approx(0.3) and rows["real"]["cut"] == pytest.approx(0.4)
  assert rows["kl"]["method"] == "KL (self-generated)" and rows["real"]["method"] == "KL (real)"


def test_report_writes_tables_and_figures(en_es, tmp_path):
  out = tmp_path / "out"
  written = report.report(str(en_es), str(out))
  names = {os.path.basename(p) for p in written}
  assert {"results.csv", "results.md", "matched.md", "trajectories.png", "method_comparison.png"} <= names
  assert all(os.path.getsize(p) > 0 for p in written)
  csv_text = (out / "results.csv").read_text()
  assert "finetune/pretrain/kl" in csv_text and "replay.method" in csv_text
  assert "75%" in (out / "matched.md").read_text()
  # the CLI form, given the results file itself
  assert report.main(["jaxreplay report", str(en_es / "results.sqlite"), "--out", str(tmp_path / "o2")]) == 0
  with pytest.raises(UsageError, match="holds no results.sqlite"):  # the CLI prints it and exits 2
    report.main(["jaxreplay report", str(tmp_path / "nothing")])


def test_capacity_slices_take_the_best_run_that_reached_the_target(tmp_path):
  w = tmp_path / "sweep"
  for tpp, before in ((10, 4.0), (100, 3.5)):
    add_run(w, f"pretrain/tpp={tpp}", config=dict(stop=dict(tokens_per_param=tpp)),
            metrics=dict(valid_ntp=before, params_paper=1000))
    for coeff, after, reason in ((0.1, before + 0.3, "target_loss"), (10.0, before + 0.1, "target_loss"),
                                 (100.0, before, "length")):  # the strongest never reached the target
      add_run(w, f"finetune/pretrain/tpp={tpp}/coeff={coeff}", parent=f"pretrain/tpp={tpp}",
              config=dict(replay=dict(method="kl", source="real", coeff=coeff), stop=dict(target_loss=2.0)),
              metrics=dict(prev_ntp=after, prev_ntp_before=before, stop_reason=reason, prev_ntp_delta=after - before))
  res = results_table.Results(str(w))
  rows = results_table.capacity_slice(res, "tpp")
  assert [r["x"] for r in rows] == [10, 100]
  assert [r["after"] for r in rows] == pytest.approx([4.1, 3.6])
  assert [r["best_coeff"] for r in rows] == [10.0, 10.0] and rows[0]["reached"] == 2
  assert "capacity_slices.png" in {os.path.basename(p) for p in report.report(str(w), str(tmp_path / "o"))}


def test_toy_curves_lay_the_chain_end_to_end(tmp_path):
  w = tmp_path / "sweep"
  acc = lambda s, a, b: dict(step=s, acc_add=a, acc_reversal=b)
  add_run(w, "add/seed=0", config=dict(seed=0), metrics=dict(step=20, acc_add=1.0, acc_reversal=0.0),
          history=[acc(0, 0.0, 0.0), acc(20, 1.0, 0.0)])
  for method, end_add in (("none", 0.1), ("ntp", 0.97)):
    add_run(w, f"reversal/add/seed=0/method={method}", parent="add/seed=0",
            config=dict(seed=0, replay=dict(method=method, source="self")),
            metrics=dict(step=30, acc_add=end_add, acc_reversal=1.0),
            history=[acc(0, 1.0, 0.0), acc(30, end_add, 1.0)])
  res = results_table.Results(str(w))
  curves = results_table.toy_curves(res)
  assert set(curves) == {"without replay", "with self-generated replay"}
  c = curves["without replay"][0]
  assert c["add"] == [(0, 0.0), (20, 1.0), (20, 1.0), (50, 0.1)] and c["_bounds"] == [20] and c["_last"] == "reversal"
  final = {r["arm"]: r for r in results_table.toy_final(res)}
  assert final["with self-generated replay"]["add"] == 0.97 and final["without replay"]["reversal"] == 1.0
  names = {os.path.basename(p) for p in report.report(str(w), str(tmp_path / "o"))}
  assert {"toy_continual.png", "toy_final.md"} <= names


def test_batch_size_rules_and_2d_grid(tmp_path):
  w = tmp_path / "sweep"
  for bs in (4, 16):
    for seed in (0, 1):
      add_run(w, f"pretrain/bs={bs},b2=0.999,seed={seed}", config=dict(seed=seed, optim=dict(
          batch_size=bs, b2=0.999, b2_half_life_tokens=0.0)), metrics=dict(valid_ntp=3.0 + bs / 100 + seed / 10))
      add_run(w, f"pretrain/bs={bs},hl,seed={seed}", config=dict(seed=seed, optim=dict(
          batch_size=bs, b2=0.999, b2_half_life_tokens=1e6)), metrics=dict(valid_ntp=3.0))
  rules = results_table.batch_size_rules(results_table.Results(str(w)))
  assert rules["β₂ = 0.999"] == {4: pytest.approx([3.04, 3.14]), 16: pytest.approx([3.16, 3.26])}
  assert rules["half-life 1M tokens"] == {4: [3.0, 3.0], 16: [3.0, 3.0]}
  assert "batch_size.png" in {os.path.basename(p) for p in report.report(str(w), str(tmp_path / "o"))}

  g = tmp_path / "grid"
  for d, params in ((1, 1000), (2, 4000)):
    for tpp in (10, 100):
      pre = f"pretrain/d={d},tpp={tpp}"
      add_run(g, pre, config=dict(stop=dict(tokens_per_param=tpp)), metrics=dict(valid_ntp=3.0, params_paper=params))
      for method in ("none", "kl"):
        add_run(g, f"finetune/{pre}/method={method}", parent=pre, config=dict(replay=dict(method=method,
                source="real")), metrics=dict(prev_ntp_delta=0.1 * d, compute_multiplier=0.5))
  grid = results_table.grid_2d(results_table.Results(str(g)))
  assert grid["no replay"][(4000, 100)] == (0.2, 0.5) and len(grid["KL (real)"]) == 4
  assert "grid_2d.png" in {os.path.basename(p) for p in report.report(str(g), str(tmp_path / "o2"))}


def test_2d_grid_compares_each_cell_at_a_matched_loss_and_takes_the_best_coefficient(tmp_path):
  """No target loss: every run of the cell reached 3.2 (KL 10 got no further), so each is read there; the KL cell
  is the better coefficient; the multiplier is read off the pretraining curve (by hand: 0.8 and 0.35)."""
  g = tmp_path / "grid"
  pre = "pretrain/d=1,tpp=10"
  curve = [dict(step=i, tokens=tok, valid_ntp=v) for i, (tok, v) in enumerate(((100, 4.0), (200, 3.5), (400, 3.0)))]
  add_run(g, pre, config=dict(stop=dict(tokens_per_param=10)), metrics=dict(valid_ntp=3.0, params_paper=1000),
          history=curve)
  for name, method, coeff, xs, ys in (("none", "none", 1.0, [4.0, 3.6, 3.2, 2.8], [3.0, 3.4, 3.8, 4.2]),
                                       ("kl1", "kl", 1.0, [4.0, 3.4, 3.0], [3.0, 3.2, 3.3]),
                                       ("kl10", "kl", 10.0, [4.0, 3.6, 3.2], [3.0, 3.1, 3.2])):
    add_run(g, f"finetune/{pre}/{name}", parent=pre, config=dict(replay=dict(method=method, source="real",
            coeff=coeff)), metrics=dict(prev_ntp=ys[-1], prev_ntp_before=3.0, prev_ntp_delta=ys[-1] - 3.0,
                                        compute_multiplier=0.0), history=traj(xs, ys))
  grid = results_table.grid_2d(results_table.Results(str(g)))
  assert grid["KL (real)"][(1000, 10)] == pytest.approx((0.2, 0.8))
  assert grid["no replay"][(1000, 10)] == pytest.approx((0.8, 0.35))


def test_half_life_grid_best_point_and_beta2(tmp_path):
  """Loss is lowest at t½ = 1e5 for batch 4 and at 1e6 for batch 16; β₂ = 0.5^(B·T/t½) by hand."""
  w = tmp_path / "sweep"
  for bs, best in ((4, 1e5), (16, 1e6)):
    for hl in (1e4, 1e5, 1e6):
      for seed in (0, 1):
        loss = 3.0 + abs(math.log10(hl / best)) / 10 + seed / 100
        add_run(w, f"pretrain/bs={bs},hl={hl:g},seed={seed}", config=dict(seed=seed, model=dict(seq_len=32), optim=dict(
            batch_size=bs, b2_half_life_tokens=hl)), metrics=dict(valid_ntp=loss),
            history=[dict(step=1, tokens=100, valid_ntp=loss + 1), dict(step=2, tokens=200, valid_ntp=loss)])
  grid = results_table.half_life_grid(results_table.Results(str(w)))
  assert [p[0] for p in grid[4]] == [1e4, 1e5, 1e6] and grid[16][0][2] == pytest.approx([3.2, 3.21])
  assert grid[16][1][1] == pytest.approx(0.5 ** (16 * 32 / 1e5))
  best = results_table.half_life_best(grid)
  assert [(r["batch"], r["best_index"], r["best_half_life"]) for r in best] == [(4, 1, 1e5), (16, 2, 1e6)]
  assert best[0]["loss"] == pytest.approx(3.005)
  curves = results_table.half_life_curves(results_table.Results(str(w)), grid)
  assert curves[4] == [(100, pytest.approx(4.0)), (200, pytest.approx(3.0))]
  assert "half_life.png" in {os.path.basename(p) for p in report.report(str(w), str(tmp_path / "o"))}


def test_learning_rate_and_time_to_target(tmp_path):
  w = tmp_path / "sweep"
  add_run(w, "pretrain/lr=0.001", config=dict(optim=dict(lr=1e-3)), metrics=dict(valid_ntp=3.2))
  for lr in (1e-5, 1e-4, 1e-3):
    add_run(w, f"finetune/pretrain/lr=0.001/lr={lr}", parent="pretrain/lr=0.001",
            config=dict(optim=dict(lr=lr), replay=dict(method="none")),
            metrics=dict(prev_ntp=3.3 + lr * 100, step=round(1 / lr), elapsed_s=1 / lr / 1000))
  for frac in (0.125, 0.25):
    add_run(w, f"finetune/pretrain/lr=0.001/replace={frac}", parent="pretrain/lr=0.001",
            config=dict(optim=dict(lr=1e-3), replay=dict(method="replace", coeff=frac, source="real")),
            metrics=dict(prev_ntp=3.35 - frac, step=1000, elapsed_s=1.2))
  res = results_table.Results(str(w))
  panels = results_table.lr_panels(res)
  assert [p[0] for p in panels["no replay"][1e-3]] == [1e-5, 1e-4, 1e-3]
  assert panels["no replay"][1e-3][0][2] == pytest.approx(1.0)  # LR × steps
  tt = results_table.time_to_target(res)
  assert [p[2] for p in tt["Increase replay"]] == [0.0, 0.125, 0.25]  # anchored at the top LR without replay
  names = {os.path.basename(p) for p in report.report(str(w), str(tmp_path / "o"))}
  assert {"learning_rate.png", "time_to_target.png"} <= names


def test_the_workdir_form_used_by_the_quickstart(tmp_path, capsys):
  pre, ft = tmp_path / "pre", tmp_path / "none"
  for d, m in ((pre, dict(valid_ntp=3.0)), (ft, dict(prev_ntp=3.4, prev_ntp_delta=0.4, valid_ntp=2.5))):
    d.mkdir()
    (d / "final.json").write_text(json.dumps(m))
    (d / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i, valid_ntp=x, prev_ntp=y)) + "\n"
                                             for i, (x, y) in enumerate(((4.0, 3.0), (2.5, 3.4)))))
  rows = report.matched_table(str(pre), {"none": str(ft)})
  assert rows[0]["matched_downstream"] == 2.5 and rows[0]["rise"] == pytest.approx(0.4)
  assert rows[0]["downstream"] == 2.5 and rows[0]["cut"] == pytest.approx(0.0)
  out = tmp_path / "out"
  assert report.main(["jaxreplay report", str(pre), str(ft), "--out", str(out)]) == 0
  table = (out / "forgetting.md").read_text()
  assert "| none" in table and "matched downstream loss" in table and table in capsys.readouterr().out
  assert os.path.getsize(out / "trajectories.png") > 0


def test_capacity_slices_without_targets_compare_at_a_matched_downstream_loss(tmp_path):
  w = tmp_path / "sweep"
  for tpp, before in ((10, 4.0), (100, 3.5)):
    add_run(w, f"pretrain/tpp={tpp}", config=dict(stop=dict(tokens_per_param=tpp)), metrics=dict(valid_ntp=before))
    for coeff, rise, end in ((1.0, 0.2, 2.0), (10.0, 0.1, 2.5)):  # coefficient 10 stops short of 2.0
      xs, ys = [4.0, 3.0, end], [before, before + rise, before + 2 * rise]
      add_run(w, f"finetune/pretrain/tpp={tpp}/coeff={coeff}", parent=f"pretrain/tpp={tpp}",
              config=dict(replay=dict(method="kl", source="real", coeff=coeff), stop=dict(target_loss=0.0)),
              metrics=dict(prev_ntp=ys[-1], prev_ntp_before=before), history=traj(xs, ys))
  rows = results_table.capacity_slice(results_table.Results(str(w)), "tpp")
  assert all(r["matched_downstream"] == 2.5 for r in rows)  # the lowest loss every run reached
  # at 2.5: coefficient 1 is at before + 0.3, coefficient 10 (which stopped there) at before + 0.2
  assert [r["after"] for r in rows] == pytest.approx([4.2, 3.7]) and rows[0]["best"] == "KL (real) 10"
  assert all(r["reached"] == 2 for r in rows)
