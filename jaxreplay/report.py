"""Tables and plots of forgetting from finished runs.

`forgetting_table` compares finetuning runs with the pretraining run they started from; `plot_trajectories`
draws the paper's Figure 1 view: previous-dataset loss against downstream loss during finetuning.
"""

from __future__ import annotations

import json
import os

from jaxreplay import metrics as metrics_lib


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
  cells = [[title for _, title, _ in cols]]
  for row in rows:
    cells.append([fmt.format(row[k]) if row.get(k) is not None else "–" for k, _, fmt in cols])
  widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def plot_trajectories(pretrain_dir: str, finetune_dirs: dict[str, str], out_path: str) -> str:
  """Previous-dataset loss (y) against downstream loss (x) along each finetuning run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name, workdir in finetune_dirs.items():
    rows = [r for r in metrics_lib.read_metrics(workdir) if "prev_ntp" in r and "valid_ntp" in r]
    ax.plot([r["valid_ntp"] for r in rows], [r["prev_ntp"] for r in rows], marker=".", label=name)
  pre = _final(pretrain_dir)
  ax.axhline(pre["valid_ntp"], color="grey", ls="--", lw=1, label="previous loss after pretraining")
  ax.set_xlabel("downstream (finetuning) validation loss")
  ax.set_ylabel("previous (pretraining) validation loss")
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  ax.set_title("Forgetting during finetuning")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path


def main(argv: list[str]) -> int:
  import argparse
  p = argparse.ArgumentParser(prog=argv[0] if argv else "jaxreplay report")
  p.add_argument("pretrain", help="workdir of the pretraining run")
  p.add_argument("finetunes", nargs="+", help="workdirs of finetuning runs")
  p.add_argument("--out", default="report")
  args = p.parse_args(argv[1:])
  dirs = {os.path.basename(os.path.normpath(d)): d for d in args.finetunes}
  rows = forgetting_table(args.pretrain, dirs)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "forgetting.md"), "w") as f:
    f.write(format_table(rows) + "\n")
  print(format_table(rows))
  print(plot_trajectories(args.pretrain, dirs, os.path.join(args.out, "trajectories.png")))
  return 0
