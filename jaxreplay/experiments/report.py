"""Tables and plots of forgetting: from finished runs, or from a sweep's results table.

`jaxreplay report RESULTS --out DIR` reads the SQLite results table the sweep runner writes
(RESULTS = the sweep's workdir or its results.sqlite) and writes every table and figure the runs in it
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
  matched.md           forgetting at matched downstream loss (English rise at equal Spanish loss)

An instruct sweep (sweeps/instruct.py) has no pretraining runs to plot against: its report is results.csv /
results.md, one row per arm with its replay settings, held-out chat loss and accuracy, the forgetting probes
(self_/real_: loss and KL to the original model on its own samples and on real text) and MCQ accuracies.

`jaxreplay report PRETRAIN FINETUNE... --out DIR` is the older form over run workdirs (quickstart).
The assembly of each figure's numbers lives here (pure, tested); drawing lives in `plots.py`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sqlite3
from collections import defaultdict

from jaxreplay.errors import SweepError, UsageError
from jaxreplay.experiments import plots
from jaxreplay.train import metrics as metrics_lib

# ----------------------------------------------------------------------------------------- run workdirs


def _final(workdir: str) -> dict:
  with open(os.path.join(workdir, "final.json")) as f:
    return json.load(f)


def forgetting_table(pretrain_dir: str, finetune_dirs: dict[str, str]) -> list[dict]:
  """One row per finetuning run: previous-dataset loss before/after, downstream loss, forgetting."""
  pre = _final(pretrain_dir)
  rows = []
  for name, workdir in finetune_dirs.items():
    r = _final(workdir)
    rows.append(dict(run=name, prev_before=pre["valid_ntp"], prev_after=r.get("prev_ntp"),
                     forgetting=r.get("prev_ntp_delta"), downstream=r.get("valid_ntp"),
                     prev_kl=r.get("prev_kl"), compute_multiplier=r.get("compute_multiplier"),
                     tokens=r.get("tokens"), stop_reason=r.get("stop_reason")))
  base = next((row["forgetting"] for row in rows if row["run"].endswith("none")), None)
  for row in rows:
    if base and row["forgetting"] is not None:
      row["forgetting_reduction"] = 1.0 - row["forgetting"] / base
  return rows


def format_table(rows: list[dict]) -> str:
  cols = [("run", "run", "{}"), ("prev_before", "prev loss before", "{:.3f}"),
          ("prev_after", "prev loss after", "{:.3f}"), ("forgetting", "forgetting", "{:+.3f}"),
          ("downstream", "downstream loss", "{:.3f}"), ("compute_multiplier", "compute mult.", "{:.2f}"),
          ("forgetting_reduction", "forgetting cut", "{:.0%}")]
  return markdown(rows, cols)


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
  trajs = {name: _traj(metrics_lib.read_metrics(d)) for name, d in finetune_dirs.items()}
  return plots.trajectories(trajs, out_path, prev_before=_final(pretrain_dir)["valid_ntp"])


def _traj(rows: list[dict], x="valid_ntp", y="prev_ntp") -> list[tuple[float, float]]:
  return [(r[x], r[y]) for r in rows if x in r and y in r and not r.get("final")]


# ----------------------------------------------------------------------------------------- results table


class Results:
  """The rows of a sweep's results table, with each run's config, metrics and logged trajectory."""

  def __init__(self, path: str):
    self.db_path = path if path.endswith(".sqlite") else os.path.join(path, "results.sqlite")
    if not os.path.exists(self.db_path):
      raise SweepError(f"{self.db_path} does not exist: give a sweep workdir (`jaxreplay sweep ... "
                       "--workdir=DIR`) or its results.sqlite.")
    self.workdir = os.path.dirname(os.path.abspath(self.db_path))
    db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
    cur = db.execute("SELECT name, stage, parent, overrides, config, metrics FROM results")
    self.rows = []
    for name, stage, parent, overrides, config, metrics in cur.fetchall():
      self.rows.append(dict(name=name, stage=stage, parent=parent, overrides=json.loads(overrides or "{}"),
                            config=json.loads(config or "{}"), metrics=json.loads(metrics or "{}")))
    db.close()
    self.by_name = {r["name"]: r for r in self.rows}

  def history(self, name: str) -> list[dict]:
    """The run's logged rows (metrics.jsonl), without the final summary row."""
    d = os.path.join(self.workdir, "runs", *name.split("/"))
    return [r for r in metrics_lib.read_metrics(d) if not r.get("final")]

  def finetunes(self) -> list[dict]:
    return [r for r in self.rows if r["parent"]]

  def pretrains(self) -> list[dict]:
    return [r for r in self.rows if not r["parent"]]


def cfg(row: dict, key: str, default=None):
  node = row["config"]
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def method_label(row: dict) -> str:
  if cfg(row, "lora.rank", 0):
    return f"LoRA r{cfg(row, 'lora.rank')}"
  m = cfg(row, "replay.method", "none")
  if m == "none":
    return "no replay"
  src = "self-generated" if cfg(row, "replay.source") == "self" else "real"
  return f"{m.upper()} ({src})" if m != "replace" else f"replace {cfg(row, 'replay.coeff'):g} ({src})"


def runs_table(res: Results) -> list[dict]:
  """One flat row per run: its overrides and its main metrics."""
  keys = ("valid_ntp", "prev_ntp", "mix_ntp", "prev_ntp_before", "prev_ntp_delta", "compute_multiplier",
          "prev_kl", "valid_acc", "self_ntp", "self_kl", "real_ntp", "real_kl",  # the last five: instruct runs
          "tokens", "step", "elapsed_s", "stop_reason")
  out = []
  for r in res.rows:
    row = dict(name=r["name"], parent=r["parent"] or "", seed=cfg(r, "seed"))
    row.update({k: v for k, v in r["overrides"].items() if k != "init.from"})
    row.update({k: r["metrics"].get(k) for k in keys if k in r["metrics"]})
    row.update({k: v for k, v in r["metrics"].items() if k.startswith(("acc_", "mcq_"))})
    out.append(row)
  return out


def write_csv(rows: list[dict], path: str) -> str:
  cols = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    w.writerows(rows)
  return path


def frontier(res: Results) -> list[tuple[float, float]]:
  """(Spanish, English) endpoints of mixed-data pretraining runs, the Pareto-optimal ones, by Spanish loss."""
  pts = sorted((r["metrics"]["mix_ntp"], r["metrics"]["valid_ntp"]) for r in res.pretrains()
               if "mix_ntp" in r["metrics"] and "valid_ntp" in r["metrics"])
  out, best = [], math.inf
  for x, y in pts:
    if y < best:
      out.append((x, y))
      best = y
  return out


def trajectories(res: Results, rows=None, label=None) -> dict:
  """{label: [(downstream loss, previous loss), ...]} for finetuning runs (default label: run name)."""
  out = {}
  for r in rows if rows is not None else res.finetunes():
    out[label(r) if label else r["name"]] = _traj(res.history(r["name"]))
  return {k: v for k, v in out.items() if v}


def at_matched(traj: list[tuple[float, float]], target: float) -> float | None:
  """Previous loss where the downstream loss first reaches `target` (linear between evaluations)."""
  for (x0, y0), (x1, y1) in zip(traj, traj[1:]):
    if x1 <= target <= x0 or x0 <= target <= x1 and x1 < x0:
      f = (x0 - target) / (x0 - x1) if x0 != x1 else 1.0
      return y0 + f * (y1 - y0)
  if traj and traj[0][0] <= target:
    return traj[0][1]
  return None


def matched_forgetting(res: Results) -> list[dict]:
  """Rise in previous-dataset loss at matched downstream loss, per finetuning run.

  For each pretrained model, the matched loss is the highest best downstream loss among its finetuning
  runs (a loss every run reached); each run's previous loss there is interpolated from its trajectory and
  compared with the no-replay run from the same model ('cut' = 1 − rise / rise without replay).
  """
  out = []
  by_parent = defaultdict(list)
  for r in res.finetunes():
    by_parent[r["parent"]].append(r)
  for parent, kids in sorted(by_parent.items()):
    trajs = {k["name"]: _traj(res.history(k["name"])) for k in kids}
    trajs = {n: t for n, t in trajs.items() if t}
    if not trajs:
      continue
    target = max(min(x for x, _ in t) for t in trajs.values())
    before = res.by_name[parent]["metrics"].get("valid_ntp") if parent in res.by_name else None
    rows = []
    for k in kids:
      if k["name"] not in trajs:
        continue
      y = at_matched(trajs[k["name"]], target)
      rows.append(dict(run=k["name"], parent=parent, seed=cfg(k, "seed"), method=method_label(k),
                       matched_downstream=target, prev_before=before, prev_at_matched=y,
                       rise=None if y is None or before is None else y - before))
    base = next((r["rise"] for r in rows if r["method"] == "no replay"), None)
    for r in rows:
      if base and r["rise"] is not None:
        r["cut"] = 1.0 - r["rise"] / base
    out.extend(rows)
  return out


def _x_of(row: dict, res: Results, key: str):
  parent = res.by_name.get(row["parent"])
  if key == "params":
    return parent["metrics"].get("params_paper") if parent else None
  if key == "tpp":
    return cfg(parent, "stop.tokens_per_param") if parent else None
  return cfg(parent, key) if parent else None


def capacity_slice(res: Results, x: str) -> list[dict]:
  """Per x value of the pretrained model (params or tpp): previous loss before finetuning and the best (lowest)
  after it among runs that reached their target loss. Runs without a target are compared at a matched
  downstream loss instead: the lowest one that every run reached (as in `matched_forgetting`), each run's
  previous loss interpolated there from its trajectory (the same as stopping at that target). A loss that only
  some runs reach would leave the best replay coefficient undefined wherever only the no-replay run got there."""
  groups = defaultdict(list)
  for r in res.finetunes():
    v = _x_of(r, res, x)
    if v:
      groups[v].append(r)
  matched = None
  if groups and not any(cfg(k, "stop.target_loss") for kids in groups.values() for k in kids):
    trajs = {k["name"]: _traj(res.history(k["name"])) for kids in groups.values() for k in kids}
    matched = max((min(x_ for x_, _ in t) for t in trajs.values() if t), default=None)
  out = []
  for v, kids in sorted(groups.items()):
    if matched is None:
      ok = [(k, k["metrics"].get("prev_ntp", math.inf)) for k in kids
            if not cfg(k, "stop.target_loss") or k["metrics"].get("stop_reason") == "target_loss"]
    else:
      ok = [(k, at_matched(trajs[k["name"]], matched)) for k in kids]
      ok = [(k, y) for k, y in ok if y is not None]
    before = kids[0]["metrics"].get("prev_ntp_before")
    best = min(ok, key=lambda p: p[1]) if ok else None
    out.append(dict(x=v, before=before, after=best[1] if best else None, matched_downstream=matched,
                    best=method_label(best[0]) + (f" {cfg(best[0], 'replay.coeff'):g}" if best and cfg(
                        best[0], "replay.method") != "none" else "") if best else None,
                    best_coeff=cfg(best[0], "replay.coeff") if best else None, reached=len(ok), runs=len(kids)))
  return out


def grid_2d(res: Results) -> dict:
  """{method: {(params, tpp): (loss delta, compute multiplier)}} over finetuning runs."""
  out = defaultdict(dict)
  for r in res.finetunes():
    p, t = _x_of(r, res, "params"), _x_of(r, res, "tpp")
    if p and t:
      out[method_label(r)][(p, t)] = (r["metrics"].get("prev_ntp_delta"), r["metrics"].get("compute_multiplier"))
  return dict(out)


def lr_panels(res: Results) -> dict:
  """{method: {pretraining LR: [(finetuning LR, previous loss after, LR × steps)]}}."""
  out = defaultdict(lambda: defaultdict(list))
  for r in res.finetunes():
    parent = res.by_name.get(r["parent"])
    if parent is None or cfg(r, "optim.lr") is None or cfg(parent, "optim.lr") is None:
      continue
    m = r["metrics"]
    out[method_label(r)][cfg(parent, "optim.lr")].append(
        (cfg(r, "optim.lr"), m.get("prev_ntp"), cfg(r, "optim.lr") * m.get("step", 0)))
  return {k: {lr: sorted(v) for lr, v in d.items()} for k, d in out.items()}


def time_to_target(res: Results) -> dict:
  """{'Reduce learning rate': [(seconds, prev loss, LR)], 'Increase replay': [(seconds, prev loss, fraction)]}."""
  lr_arm, replay_arm = [], []
  for r in res.finetunes():
    m, method = r["metrics"], cfg(r, "replay.method")
    point = (m.get("elapsed_s"), m.get("prev_ntp"))
    if None in point or cfg(r, "optim.lr") is None:
      continue
    if method == "none":
      lr_arm.append(point + (cfg(r, "optim.lr"),))
    elif method == "replace":
      replay_arm.append(point + (cfg(r, "replay.coeff"),))
  if replay_arm and lr_arm:  # the highest-LR run without replay anchors the replay arm (fraction 0)
    top = max(lr_arm, key=lambda p: p[2])
    replay_arm.append(top[:2] + (0.0,))
  return {"Reduce learning rate": sorted(lr_arm, key=lambda p: -p[2]),
          "Increase replay": sorted(replay_arm, key=lambda p: p[2])}


def toy_curves(res: Results) -> dict:
  """{arm: {seed: {task: [(step along the chain, accuracy)]}}} for chains of toy-task runs (acc_* metrics).

  A chain is a run without children followed back to its first task; its stages' steps are laid end to end.
  """
  parents = {r["parent"] for r in res.rows if r["parent"]}
  out = defaultdict(dict)
  for leaf in res.rows:
    if leaf["name"] in parents or not any(k.startswith("acc_") for k in leaf["metrics"]):
      continue
    chain, r = [], leaf
    while r is not None:
      chain.append(r)
      r = res.by_name.get(r["parent"]) if r["parent"] else None
    curves, offset, bounds = defaultdict(list), 0, []
    for stage in reversed(chain):
      hist = res.history(stage["name"])
      for h in hist:
        for k, v in h.items():
          if k.startswith("acc_"):
            curves[k[4:]].append((offset + h["step"], v))
      offset += stage["metrics"].get("step", 0)
      bounds.append(offset)
    arm = "with self-generated replay" if cfg(leaf, "replay.method", "none") != "none" else "without replay"
    out[arm][cfg(leaf, "seed", 0)] = dict(curves, _bounds=bounds[:-1], _last=leaf["stage"])
  return dict(out)


def toy_final(res: Results) -> list[dict]:
  """Final accuracy on every task at the end of each chain (one row per arm and seed)."""
  rows = []
  for arm, seeds in sorted(toy_curves(res).items()):
    for seed, curves in sorted(seeds.items()):
      row = dict(arm=arm, seed=seed, last=curves["_last"])
      row.update({t: pts[-1][1] for t, pts in curves.items() if not t.startswith("_") and pts})
      rows.append(row)
  return rows


def batch_size_rules(res: Results) -> dict:
  """{β₂ rule: {batch size: [final validation loss per seed]}} over pretraining runs."""
  out = defaultdict(lambda: defaultdict(list))
  for r in res.pretrains():
    hl = cfg(r, "optim.b2_half_life_tokens", 0.0)
    rule = f"half-life {hl / 1e6:.3g}M tokens" if hl else f"β₂ = {cfg(r, 'optim.b2')}"
    if "valid_ntp" in r["metrics"]:
      out[rule][cfg(r, "optim.batch_size")].append(r["metrics"]["valid_ntp"])
  return {k: dict(sorted(v.items())) for k, v in out.items()}


def report(path: str, out: str) -> list[str]:
  """Writes every table and figure the results table supports into `out`; returns the files written."""
  res = Results(path)
  os.makedirs(out, exist_ok=True)
  table = runs_table(res)
  written = [write_csv(table, os.path.join(out, "results.csv"))]
  cols = [(k, k, "{:.4g}" if isinstance(table[0].get(k), float) else "{}") for k in
          dict.fromkeys(k for r in table for k in r)] if table else []
  _write(os.path.join(out, "results.md"), markdown(table, cols), written)
  fts = res.finetunes()
  parents = {r["parent"] for r in fts}
  if fts:
    _write(os.path.join(out, "matched.md"), markdown(matched_forgetting(res), [
        ("run", "run", "{}"), ("method", "method", "{}"), ("seed", "seed", "{}"),
        ("matched_downstream", "matched downstream loss", "{:.3f}"), ("prev_before", "prev before", "{:.3f}"),
        ("prev_at_matched", "prev at matched", "{:.3f}"), ("rise", "rise", "{:+.3f}"),
        ("cut", "forgetting cut", "{:.0%}")]), written)
    trajs = trajectories(res, label=lambda r: r["name"].split("/")[-1] + (
        f" ← {r['parent']}" if len(parents) > 1 else ""))
    if trajs and (len(parents) <= 3 or len(fts) <= 12):
      written.append(plots.trajectories(trajs, os.path.join(out, "trajectories.png"), frontier=frontier(res)))
  if len({m for r in fts for m in [method_label(r)]}) >= 3 and len(parents) == 1:
    written.append(plots.method_comparison(trajectories(res, label=method_label),
                                           os.path.join(out, "method_comparison.png")))
  g = grid_2d(res)
  if any(len({p for p, _ in d}) > 1 and len({t for _, t in d}) > 1 for d in g.values()):
    written.append(plots.grid_2d(g, os.path.join(out, "grid_2d.png")))
  slices = {x: capacity_slice(res, x) for x in ("params", "tpp")}
  slices = {x: [r for r in s if r["before"] is not None] for x, s in slices.items()}
  slices = {x: s for x, s in slices.items() if len(s) > 1}
  if slices:
    written.append(plots.capacity_slices(slices, os.path.join(out, "capacity_slices.png")))
    for x, rows in slices.items():
      _write(os.path.join(out, f"capacity_{x}.md"), markdown(rows, [
          ("x", x, "{:g}"), ("before", "prev loss before", "{:.3f}"), ("after", "best prev loss after", "{:.3f}"),
          ("best", "best run", "{}"), ("matched_downstream", "at downstream loss", "{:.3f}"),
          ("reached", "runs that reached it", "{}"), ("runs", "runs", "{}")]), written)
  lr = lr_panels(res)
  if any(len(v) > 2 for d in lr.values() for v in d.values()):
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
  if len(args.paths) == 1 and (first.endswith(".sqlite") or os.path.exists(os.path.join(first, "results.sqlite"))):
    for path in report(first, args.out):
      print(path)
    return 0
  if len(args.paths) < 2:
    raise UsageError(f"{first} holds no results.sqlite: give a sweep workdir, or a pretraining workdir followed "
                     "by finetuning workdirs.")
  dirs = {os.path.basename(os.path.normpath(d)): d for d in args.paths[1:]}
  rows = forgetting_table(first, dirs)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "forgetting.md"), "w") as f:
    f.write(format_table(rows) + "\n")
  print(format_table(rows))
  print(plot_trajectories(first, dirs, os.path.join(args.out, "trajectories.png")))
  return 0
