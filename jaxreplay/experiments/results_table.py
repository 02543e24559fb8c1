"""A sweep's results table (the rows the runner records) and the numbers each of the report's figures needs.

Pure functions of the table and the runs' logged metrics, tested on hand-made tables; `report.py` writes them
and `plots.py` draws them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
from collections import defaultdict

from jaxreplay import rundir
from jaxreplay.errors import SweepError
from jaxreplay.evals.forgetting import compute_multiplier, pretraining_curve
from jaxreplay.io import read_metrics


def trajectory(rows: list[dict], x="valid_ntp", y="prev_ntp") -> list[tuple[float, float]]:
  """(x, y) of every logged evaluation row that has both (the final summary row left out)."""
  return [(r[x], r[y]) for r in rows if x in r and y in r and not r.get("final")]



class Results:
  """The rows of a sweep's results table, with each run's config, metrics and logged trajectory."""

  def __init__(self, path: str, workdir: str | None = None):
    """path: a sweep workdir on disk or its results.sqlite; workdir: the sweep's, where the table is a local
    cache of a workdir elsewhere (a gs:// one: sweepdir.refresh)."""
    self.db_path = path if path.endswith(".sqlite") else os.path.join(path, rundir.RESULTS)
    if not os.path.exists(self.db_path):
      raise SweepError(f"{self.db_path} does not exist: give a sweep workdir (`jaxreplay sweep ... "
                       "--workdir=DIR`) or its results.sqlite.")
    self.workdir = workdir or os.path.dirname(os.path.abspath(self.db_path))
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
    d = rundir.run_dir(self.workdir, name)
    return [r for r in read_metrics(d) if not r.get("final")]

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


def trajectories(res: Results, label) -> dict:
  """{label(run): [(downstream loss, previous loss), ...]} for the finetuning runs that logged evaluations."""
  out = {label(r): trajectory(res.history(r["name"])) for r in res.finetunes()}
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


def matched_loss(trajs) -> float | None:
  """The highest of the trajectories' lowest downstream losses: one that every run with evaluations reached."""
  reached = [min(x for x, _ in t) for t in trajs if t]
  return max(reached) if reached else None


def matched_rows(trajs: dict, before: float | None, baseline: str | None = None) -> list[dict]:
  """One row per run of trajs ({name: trajectory}): its previous loss where its downstream loss first reaches the
  matched loss (`matched_loss`, interpolated between evaluations), its rise over `before`, and, given the name of
  the run without replay, the share of that run's rise it avoids ('cut' = 1 − rise / rise without replay)."""
  target = matched_loss(trajs.values())
  rows = []
  for name, t in trajs.items():
    y = at_matched(t, target) if t else None
    rows.append(dict(run=name, matched_downstream=target, prev_before=before, prev_at_matched=y,
                     rise=None if y is None or before is None else y - before))
  base = next((r["rise"] for r in rows if r["run"] == baseline), None)
  for r in rows:
    r["cut"] = 1.0 - r["rise"] / base if base and r["rise"] is not None else None
  return rows


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
    kids = {k["name"]: k for k in kids}
    trajs = {n: t for n in kids if (t := trajectory(res.history(n)))}
    before = res.by_name[parent]["metrics"].get("valid_ntp") if parent in res.by_name else None
    baseline = next((n for n in trajs if method_label(kids[n]) == "no replay"), None)
    for row in matched_rows(trajs, before, baseline):
      k = kids[row["run"]]
      out.append(dict(row, parent=parent, seed=cfg(k, "seed"), method=method_label(k)))
  return out


def x_of(row: dict, res: Results, key: str):
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
    v = x_of(r, res, x)
    if v:
      groups[v].append(r)
  matched, trajs = None, {}
  if groups and not any(cfg(k, "stop.target_loss") for kids in groups.values() for k in kids):
    trajs = {k["name"]: trajectory(res.history(k["name"])) for kids in groups.values() for k in kids}
    matched = matched_loss(trajs.values())
  out = []
  for v, kids in sorted(groups.items()):
    ok = prev_after(kids, trajs, matched)
    before = kids[0]["metrics"].get("prev_ntp_before")
    best = min(ok, key=lambda p: p[1]) if ok else None
    out.append(dict(x=v, before=before, after=best[1] if best else None, matched_downstream=matched,
                    best=method_label(best[0]) + (f" {cfg(best[0], 'replay.coeff'):g}" if best and cfg(
                        best[0], "replay.method") != "none" else "") if best else None,
                    best_coeff=cfg(best[0], "replay.coeff") if best else None, reached=len(ok), runs=len(kids)))
  return out


def prev_after(kids: list[dict], trajs: dict, matched: float | None) -> list[tuple[dict, float]]:
  """(run, its previous loss after finetuning) for each of kids that counts: with a matched downstream loss,
  the runs that reached it, read off their trajectories ({name: trajectory}) there; without one, at the end of
  the runs that had no target loss or reached it."""
  if matched is None:
    return [(k, k["metrics"].get("prev_ntp", math.inf)) for k in kids
            if not cfg(k, "stop.target_loss") or k["metrics"].get("stop_reason") == "target_loss"]
  pairs = [(k, at_matched(trajs[k["name"]], matched)) for k in kids]
  return [(k, y) for k, y in pairs if y is not None]


def grid_2d(res: Results) -> dict:
  """{method: {(params, tpp): (loss delta, compute multiplier)}}, one cell per pretrained model (the mean over
  pretrained models that share a cell, e.g. seeds). A method run at several replay coefficients shows its best
  (lowest previous loss). A cell's runs are compared at the lowest downstream loss every one of them reached, each
  run's previous loss interpolated there from its evaluations (as capacity_slice; where every run stopped at one
  target loss, that is the target), and the multiplier is read off the pretraining run's curve at that loss.
  Runs without logged evaluations are read at their end, those with a target loss only if they reached it."""
  cells = defaultdict(list)
  for r in res.finetunes():
    p, t = x_of(r, res, "params"), x_of(r, res, "tpp")
    if p and t:
      cells[(p, t, r["parent"])].append(r)
  sums = defaultdict(lambda: defaultdict(list))
  for (p, t, parent), kids in cells.items():
    for method, vals in _cell_best(res, parent, kids).items():
      sums[method][(p, t)].append(vals)
  return {m: {k: tuple(_mean(v[i] for v in vs) for i in range(2)) for k, vs in d.items()} for m, d in sums.items()}


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return sum(xs) / len(xs) if xs else None


def _cell_best(res: Results, parent: str, kids: list[dict]) -> dict:
  """{method: (loss delta, compute multiplier)} of the best run of each method among one model's finetunes."""
  trajs = {k["name"]: trajectory(res.history(k["name"])) for k in kids}
  matched = matched_loss(trajs.values()) if all(trajs.values()) else None
  tokens, losses = pretraining_curve(res.history(parent))
  best = {}
  for k, prev in prev_after(kids, trajs, matched):
    m = k["metrics"]
    if matched is None:
      vals = (m.get("prev_ntp_delta"), m.get("compute_multiplier"))
    elif m.get("prev_ntp_before") is None:
      continue
    else:
      vals = (prev - m["prev_ntp_before"], compute_multiplier(tokens, losses, prev) if len(tokens) else None)
    label = method_label(k)
    if label not in best or prev < best[label][0]:
      best[label] = (prev, vals)
  return {label: vals for label, (_, vals) in best.items()}


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


def half_life_grid(res: Results) -> dict:
  """{batch size: [(β₂ half-life in tokens, β₂, [final validation loss per seed])]} over pretraining runs that set
  a half-life, sorted by half-life; β₂ = 0.5^(B·T / t½), the value the optimizer used."""
  out = defaultdict(lambda: defaultdict(list))
  seq = {}
  for r in res.pretrains():
    hl, b = cfg(r, "optim.b2_half_life_tokens", 0.0), cfg(r, "optim.batch_size")
    if hl and "valid_ntp" in r["metrics"] and cfg(r, "model.seq_len"):
      out[b][hl].append(r["metrics"]["valid_ntp"])
      seq[b] = cfg(r, "model.seq_len")
  return {b: [(hl, 0.5 ** (b * seq[b] / hl), losses) for hl, losses in sorted(d.items())]
          for b, d in sorted(out.items())}


def half_life_best(grid: dict) -> list[dict]:
  """Per batch size: the half-life (and its β₂) with the lowest mean final loss, and its grid index."""
  rows = []
  for b, points in grid.items():
    means = [sum(losses) / len(losses) for _, _, losses in points]
    i = min(range(len(points)), key=means.__getitem__)
    rows.append(dict(batch=b, best_index=i, best_half_life=points[i][0], best_b2=points[i][1], loss=means[i],
                     seeds=len(points[i][2])))
  return rows


def half_life_curves(res: Results, grid: dict) -> dict:
  """{batch size: [(tokens, validation loss)]} of the best half-life's first-seed run: whether it flattened."""
  best = {r["batch"]: r["best_half_life"] for r in half_life_best(grid)}
  out = {}
  for r in sorted(res.pretrains(), key=lambda r: cfg(r, "seed", 0)):
    b = cfg(r, "optim.batch_size")
    if b in best and b not in out and cfg(r, "optim.b2_half_life_tokens") == best[b]:
      out[b] = [(h["tokens"], h["valid_ntp"]) for h in res.history(r["name"]) if "valid_ntp" in h]
  return out
