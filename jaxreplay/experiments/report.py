"""Tables and plots of forgetting: from finished runs, or from a sweep's results table.

`jaxreplay report RESULTS --out DIR` reads the SQLite results table the sweep runner writes
(RESULTS = the sweep's workdir or its results.sqlite; a gs:// workdir is read directly, its table rebuilt in
this host's cache from the final.json objects) and writes every table and figure the runs in it
support: results.csv / results.md (one row per run), and, when the runs vary what the figure needs,

  trajectories.png     previous-dataset loss against downstream loss along each finetuning run, with the
                       pretraining frontier of mixed-data pretraining runs (the paper's Figure 1)
  grid_2d.png          loss delta and compute multiplier over model size × tokens per parameter
  capacity_slices.png  previous-dataset loss before / best after finetuning against model size and TPP
  learning_rate.png    forgetting against the finetuning LR, one line per pretraining LR; LR × steps
  time_to_target.png   previous-dataset loss against training time: lower LR vs more replay
  toy_continual.png    accuracy on each toy task along the chain of tasks, without / with replay
  method_comparison.png  trajectories of each finetuning method from one pretrained model
  batch_size.png       final loss against batch size for each β₂ rule
  half_life.png        final loss against the β₂ half-life in tokens and against β₂, one line per batch size
  matched.md           forgetting at matched downstream loss (English rise at equal Spanish loss)

An instruct sweep (sweeps/instruct.py) has no pretraining runs to plot against: its report is results.csv /
results.md, one row per arm with its replay settings, held-out chat loss and accuracy, the forgetting probes
(self_/real_: loss and KL to the original model on its own samples and on real text) and MCQ accuracies.

`jaxreplay report PRETRAIN FINETUNE... --out DIR` is the older form over run workdirs: the quickstart's
matched-loss table (forgetting.md) and trajectories.png.
The assembly of each figure's numbers lives in `results_table.py` (pure, tested); drawing in `plots.py`.
"""

from __future__ import annotations

import argparse
import math
import os

from jaxreplay import io, rundir
from jaxreplay.errors import UsageError
from jaxreplay.experiments import plots, sweepdir
from jaxreplay.experiments.results_table import (Results, batch_size_rules, capacity_slice, frontier, grid_2d,
                                                 half_life_best, half_life_curves, half_life_grid, lr_panels,
                                                 matched_forgetting, matched_rows, method_label, runs_table,
                                                 time_to_target, toy_curves, toy_final, trajectories, trajectory,
                                                 write_csv)
from jaxreplay.io import read_metrics

# ----------------------------------------------------------------------------------------- run workdirs


def matched_table(pretrain_dir: str, finetune_dirs: dict[str, str]) -> list[dict]:
  """One row per finetune: its previous-dataset loss where its downstream loss first reached the matched loss.

  The matched loss is the highest of the runs' lowest evaluated downstream losses (one every run reached);
  each run's previous loss there is interpolated between its evaluations (`results_table.at_matched`), and its
  rise over the pretrained model's previous loss is compared with the run without replay ('cut' = 1 − rise /
  rise without replay). End-of-run numbers would favour whichever run trained on the downstream data least.
  """
  trajs = {name: trajectory(read_metrics(d)) for name, d in finetune_dirs.items()}
  baseline = next((n for n in trajs if n.endswith("none")), None)
  table = matched_rows(trajs, rundir.read_final(pretrain_dir)["valid_ntp"], baseline)
  for row in table:
    final = rundir.read_final(finetune_dirs[row["run"]])
    row.update(downstream=final.get("valid_ntp"), compute_multiplier=final.get("compute_multiplier"))
  return table


def format_matched(rows: list[dict], old: str = "previous", new: str = "downstream") -> str:
  """A matched-loss table (`matched_table`, `matched_forgetting`) as Markdown, naming the datasets old and
  new; columns no row has are left out."""
  cols = [("run", "run", "{}"), ("method", "method", "{}"), ("seed", "seed", "{}"),
          ("prev_before", f"{old} loss before", "{:.3f}"),
          ("matched_downstream", f"matched {new} loss", "{:.3f}"),
          ("prev_at_matched", f"{old} loss there", "{:.3f}"), ("rise", "forgetting", "{:+.3f}"),
          ("cut", "forgetting cut", "{:.0%}"), ("downstream", f"{new} loss at end", "{:.3f}"),
          ("compute_multiplier", "compute mult.", "{:.2f}")]
  return markdown(rows, [c for c in cols if any(c[0] in r for r in rows)])


def markdown(rows: list[dict], cols) -> str:
  """A Markdown table; cols are (key, title, format) and a missing value prints as '–'."""
  cells = [[title for _, title, _ in cols]]
  for row in rows:
    cells.append([_fmt(fmt, row.get(k)) for k, _, fmt in cols])
  widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def _fmt(fmt, v) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  try:
    return fmt.format(v)
  except (ValueError, TypeError):
    return str(v)


def plot_trajectories(pretrain_dir: str, finetune_dirs: dict[str, str], out_path: str) -> str:
  """Previous-dataset loss (y) against downstream loss (x) along each finetuning run."""
  trajs = {name: trajectory(read_metrics(d)) for name, d in finetune_dirs.items()}
  return plots.trajectories(trajs, out_path, prev_before=rundir.read_final(pretrain_dir)["valid_ntp"])


def report(path: str, out: str) -> list[str]:
  """Writes every table and figure the results table supports into `out`; returns the files written."""
  # A gs:// sweep's table is this host's cache, rebuilt from the bucket's final.json objects before it is read.
  res = Results(sweepdir.refresh(path), workdir=io.abspath(path)) if io.is_url(path) else Results(path)
  os.makedirs(out, exist_ok=True)
  table = runs_table(res)
  written = [write_csv(table, os.path.join(out, "results.csv"))]
  cols = [(k, k, "{:.4g}" if isinstance(table[0].get(k), float) else "{}") for k in
          dict.fromkeys(k for r in table for k in r)] if table else []
  _write(os.path.join(out, "results.md"), markdown(table, cols), written)
  fts = res.finetunes()
  parents = {r["parent"] for r in fts}
  if fts:
    _write(os.path.join(out, "matched.md"), format_matched(matched_forgetting(res)), written)
    trajs = trajectories(res, label=lambda r: r["name"].split("/")[-1] + (
        f" ← {r['parent']}" if len(parents) > 1 else ""))
    if trajs and (len(parents) <= 3 or len(fts) <= 12):
      written.append(plots.trajectories(trajs, os.path.join(out, "trajectories.png"), frontier=frontier(res)))
  if len({method_label(r) for r in fts}) >= 3 and len(parents) == 1:
    written.append(plots.method_comparison(trajectories(res, label=method_label),
                                           os.path.join(out, "method_comparison.png")))
  g = grid_2d(res)
  if any(len({p for p, _ in d}) > 1 and len({t for _, t in d}) > 1 for d in g.values()):
    written.append(plots.grid_2d(g, os.path.join(out, "grid_2d.png")))
  slices = {x: [r for r in capacity_slice(res, x) if r["before"] is not None] for x in ("params", "tpp")}
  slices = {x: s for x, s in slices.items() if len(s) > 1}
  if slices:
    written.append(plots.capacity_slices(slices, os.path.join(out, "capacity_slices.png")))
    for x, rows in slices.items():
      _write(os.path.join(out, f"capacity_{x}.md"), markdown(rows, [
          ("x", x, "{:g}"), ("before", "prev loss before", "{:.3f}"), ("after", "best prev loss after", "{:.3f}"),
          ("best", "best run", "{}"), ("matched_downstream", "at downstream loss", "{:.3f}"),
          ("reached", "runs that reached it", "{}"), ("runs", "runs", "{}")]), written)
  lr = lr_panels(res)
  if any(len(v) > 1 for d in lr.values() for v in d.values()):  # a line needs two finetuning LRs
    written.append(plots.learning_rate(lr, os.path.join(out, "learning_rate.png")))
  tt = time_to_target(res)
  if tt["Increase replay"] and len(tt["Reduce learning rate"]) > 1:
    written.append(plots.time_to_target(tt, os.path.join(out, "time_to_target.png")))
  toy = toy_curves(res)
  if toy:
    written.append(plots.toy_continual(toy, os.path.join(out, "toy_continual.png")))
    final = toy_final(res)
    tasks = [k for k in final[0] if k not in ("arm", "seed", "last")]
    _write(os.path.join(out, "toy_final.md"), markdown(final, [("arm", "arm", "{}"), ("seed", "seed", "{}"),
                                                               ("last", "last task trained", "{}")]
                                                       + [(t, t, "{:.1%}") for t in tasks]), written)
  bs = batch_size_rules(res)
  if any(len(v) > 1 for v in bs.values()) and len(bs) > 1:
    written.append(plots.batch_size(bs, os.path.join(out, "batch_size.png")))
  hl = half_life_grid(res)
  if len(hl) > 1 and all(len(points) >= 3 for points in hl.values()):
    written.append(plots.half_life(hl, half_life_curves(res, hl), os.path.join(out, "half_life.png")))
    _write(os.path.join(out, "half_life.md"), markdown(half_life_best(hl), [
        ("batch", "batch size", "{}"), ("best_index", "grid index", "{}"), ("best_half_life", "best half-life", "{:g}"),
        ("best_b2", "its β₂", "{:.6f}"), ("loss", "mean final loss", "{:.4f}"), ("seeds", "seeds", "{}")]), written)
  return written


def _write(path: str, text: str, written: list):
  with open(path, "w") as f:
    f.write(text + "\n")
  written.append(path)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog=argv[0] if argv else "jaxreplay report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", help="RESULTS (a sweep workdir or its results.sqlite), or PRETRAIN FINETUNE...")
  p.add_argument("--out", default="report")
  args = p.parse_args(argv[1:])
  first = args.paths[0]
  if len(args.paths) == 1 and (first.endswith(".sqlite") or io.is_url(first)
                               or os.path.exists(os.path.join(first, rundir.RESULTS))):
    for path in report(first, args.out):
      print(path)
    return 0
  if len(args.paths) < 2:
    raise UsageError(f"{first} holds no results.sqlite: give a sweep workdir, or a pretraining workdir followed "
                     "by finetuning workdirs.")
  dirs = {os.path.basename(os.path.normpath(d)): d for d in args.paths[1:]}
  os.makedirs(args.out, exist_ok=True)
  text = format_matched(matched_table(first, dirs))
  _write(os.path.join(args.out, "forgetting.md"), text, [])
  print(text)
  print(plot_trajectories(first, dirs, os.path.join(args.out, "trajectories.png")))
  return 0
