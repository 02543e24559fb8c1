"""The paper's figure kinds, drawn with matplotlib from the numbers `report.py` assembles.

Each function takes plain Python data (no results-table access) and writes one PNG, returning its path.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _plt():
  """pyplot on the Agg backend (files only, no display); imported on first use, since only drawing needs it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out_path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  _plt().close(fig)
  return out_path


def trajectories(trajs: dict, out_path: str, frontier=None, prev_before: float | None = None) -> str:
  """Previous-dataset loss (y) against downstream loss (x) along each run; the pretraining frontier dashed."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.8))
  for name, pts in trajs.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=3, lw=1.2, label=name)
    ax.plot(pts[0][0], pts[0][1], "x", color="k", ms=7)
  if frontier:
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "--o", color="grey", ms=3, lw=1,
            label="pretraining frontier")
  if prev_before is not None:
    ax.axhline(prev_before, color="grey", ls=":", lw=1, label="previous loss after pretraining")
  ax.set(xlabel="downstream (finetuning) validation loss", ylabel="previous (pretraining) validation loss",
         title="Forgetting during finetuning")
  ax.invert_xaxis()
  ax.legend(fontsize=7)
  return _save(fig, out_path)


def method_comparison(trajs: dict, out_path: str) -> str:
  """Log-likelihood on the previous data against log-likelihood on the downstream data, one line per method,
  each cut at its best downstream point."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.8))
  for name, pts in sorted(trajs.items()):
    best = min(range(len(pts)), key=lambda i: pts[i][0])
    pts = pts[:best + 1]
    ax.plot([-p[0] for p in pts], [-p[1] for p in pts], marker=".", ms=3, label=name)
  ax.set(xlabel="downstream log-likelihood", ylabel="previous-data log-likelihood", title="Method comparison")
  ax.legend(fontsize=8)
  return _save(fig, out_path)


def grid_2d(grid: dict, out_path: str) -> str:
  """Heatmaps over model size × TPP: loss delta (top row) and compute multiplier (bottom), one column per method."""
  plt = _plt()
  methods = sorted(grid)
  fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 7), squeeze=False)
  for j, m in enumerate(methods):
    sizes = sorted({p for p, _ in grid[m]})
    tpps = sorted({t for _, t in grid[m]})
    for i, (what, cmap) in enumerate((("loss delta", "magma_r"), ("compute multiplier", "viridis"))):
      z = np.full((len(tpps), len(sizes)), np.nan)
      for (p, t), vals in grid[m].items():
        if vals[i] is not None:
          z[tpps.index(t), sizes.index(p)] = vals[i]
      ax = axes[i][j]
      im = ax.imshow(z, origin="lower", aspect="auto", cmap=cmap)
      for (y, x), v in np.ndenumerate(z):
        if np.isfinite(v):
          ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="grey")
      ax.set_xticks(range(len(sizes)), [f"{p / 1e6:.2g}M" for p in sizes], fontsize=7, rotation=45)
      ax.set_yticks(range(len(tpps)), [f"{t:g}" for t in tpps], fontsize=7)
      ax.set(xlabel="model parameters", ylabel="tokens per parameter")
      ax.set_title(f"{m}: {what}", fontsize=9)
      fig.colorbar(im, ax=ax)
  return _save(fig, out_path)


def capacity_slices(slices: dict, out_path: str) -> str:
  """Previous loss before (blue) and best after finetuning (green), forgetting shaded, against size and TPP."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(slices), figsize=(5 * len(slices), 4), squeeze=False)
  titles = dict(params="Larger models forget less?", tpp="Longer pretraining increases forgetting?")
  for ax, (x, rows) in zip(axes[0], slices.items()):
    xs = [r["x"] for r in rows]
    before = [r["before"] for r in rows]
    after = [r["after"] if r["after"] is not None else math.nan for r in rows]
    ax.plot(xs, before, "o-", color="tab:blue", label="before finetuning")
    ax.plot(xs, after, "o-", color="tab:green", label="after (best coefficient)")
    ax.fill_between(xs, before, after, color="tab:red", alpha=0.25, label="forgetting")
    ax.set(xscale="log", xlabel="model parameters" if x == "params" else "tokens per parameter",
           ylabel="pretraining loss")
    ax.set_title(titles.get(x, x), fontsize=10)
    ax.legend(fontsize=8)
  return _save(fig, out_path)


def learning_rate(panels: dict, out_path: str) -> str:
  """Previous loss after finetuning against finetuning LR (one panel per method, one line per pretraining LR),
  and LR × steps for the first method."""
  plt = _plt()
  methods = sorted(panels)
  fig, axes = plt.subplots(1, len(methods) + 1, figsize=(4.5 * (len(methods) + 1), 4))
  for ax, m in zip(axes, methods):
    for pre_lr, pts in sorted(panels[m].items()):
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"pretrain LR {pre_lr:g}")
    ax.set(xscale="log", xlabel="finetuning LR", ylabel="pretraining loss after finetuning", title=m)
    ax.legend(fontsize=7)
  ax = axes[-1]
  for pre_lr, pts in sorted(panels[methods[0]].items()):
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, label=f"pretrain LR {pre_lr:g}")
  ax.set(xscale="log", yscale="log", xlabel="finetuning LR", ylabel="finetuning LR × steps",
         title=f"{methods[0]}: LR × steps to target")
  return _save(fig, out_path)


def time_to_target(arms: dict, out_path: str) -> str:
  """Previous loss against training time: lowering the LR (blue) vs raising the replay fraction (red)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for (name, pts), color in zip(arms.items(), ("tab:blue", "tab:red")):
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=name)
    for t, y, v in pts:
      ax.annotate(f"{v:g}", (t, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
  ax.set(xscale="log", xlabel="training time to target (s)", ylabel="pretraining loss after finetuning")
  ax.legend(fontsize=8)
  return _save(fig, out_path)


def toy_continual(curves: dict, out_path: str) -> str:
  """Accuracy of each task along the chain, one panel per arm; mean over seeds with the min–max band."""
  plt = _plt()
  arms = sorted(curves, key=lambda a: a != "without replay")
  fig, axes = plt.subplots(1, len(arms), figsize=(5.5 * len(arms), 4), squeeze=False, sharey=True)
  for ax, arm in zip(axes[0], arms):
    seeds = curves[arm]
    tasks = [t for t in next(iter(seeds.values())) if not t.startswith("_")]
    for k, task in enumerate(tasks):
      steps = sorted({s for c in seeds.values() for s, _ in c.get(task, [])})
      per_seed = [dict(c.get(task, [])) for c in seeds.values()]
      vals = np.array([[d.get(s, np.nan) for s in steps] for d in per_seed]) * 100
      mean = np.nanmean(vals, axis=0)
      ax.plot(steps, mean, color=f"C{k}", label=task)
      if len(per_seed) > 1:
        ax.fill_between(steps, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0), color=f"C{k}", alpha=0.2)
    for b in next(iter(seeds.values()))["_bounds"]:
      ax.axvline(b, color="grey", ls="--", lw=0.8)
    ax.set(title=f"{arm[0].upper()}{arm[1:]} ({len(seeds)} seed{'s' * (len(seeds) > 1)})", xlabel="training step",
           ylim=(-2, 102))
  axes[0][0].set_ylabel("eval accuracy (%)")
  axes[0][0].legend(fontsize=8)
  return _save(fig, out_path)


def batch_size(rules: dict, out_path: str) -> str:
  """Final validation loss against batch size for each β₂ rule (mean over seeds, min–max bars)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for rule, by_bs in rules.items():
    bs = sorted(by_bs)
    vals = [np.asarray(by_bs[b]) for b in bs]
    mean = [v.mean() for v in vals]
    err = [[m - v.min() for m, v in zip(mean, vals)], [v.max() - m for m, v in zip(mean, vals)]]
    spread = max(mean) - min(mean)
    ax.errorbar(bs, mean, yerr=err, marker="o", capsize=3, label=f"{rule} (spread {spread:.3f})")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="batch size (sequences)", ylabel="final validation loss",
         title="Fixed token budget: final loss across batch sizes")
  ax.legend(fontsize=8)
  return _save(fig, out_path)


def half_life(grid: dict, curves: dict, out_path: str) -> str:
  """Final loss above each batch size's best against the β₂ half-life in tokens and against 1 − β₂, one line per
  batch size (mean over seeds, min–max bars, the best point starred; absolute losses differ by batch size far
  more than across half-lives); and the best run's validation curve per batch size."""
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for b, points in grid.items():
    vals = [np.asarray(losses) for _, _, losses in points]
    mean = np.array([v.mean() for v in vals])
    i = int(mean.argmin())
    err = [mean - [v.min() for v in vals], [v.max() for v in vals] - mean]
    for ax, xs in ((axes[0], [p[0] for p in points]), (axes[1], [1 - p[1] for p in points])):
      line = ax.errorbar(xs, mean - mean[i], yerr=err, marker="o", capsize=3, label=f"batch {b} (best {mean[i]:.3f})")
      ax.plot([xs[i]], [0.0], "*", ms=14, color=line[0].get_color())
    if b in curves:
      axes[2].plot(*zip(*curves[b]), marker=".", label=f"batch {b}")
  above = "final loss − the batch size's best"
  for ax, xlabel, ylabel, title in zip(
      axes, ("β₂ half-life (tokens)", "1 − β₂", "tokens"), (above, above, "validation loss"),
      ("Final loss against the β₂ half-life", "Final loss against β₂", "Best half-life's validation curve")):
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
  return _save(fig, out_path)
