"""`jaxreplay quickstart`: the whole programme in minutes on a laptop CPU.

Pretrains a small model on English (King James Bible), finetunes it on Spanish (Reina-Valera 1909) without
replay and with self-generated KL replay, prints how much English each run forgot at the matched Spanish loss
(the lowest Spanish loss both finetunes reached, as docs/results.md compares them) and plots the runs.
Every stage resumes if interrupted; a finished quickstart prints its table again at once.
"""

from __future__ import annotations

import argparse
import os

from jaxreplay.experiments import report, resolve
from jaxreplay.io import write_json
from jaxreplay.train import loop as training

RUNS = (("pretrain", "pretrain"), ("finetune", "finetune_none"), ("finetune_kl", "finetune_kl_self"))


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog=argv[0] if argv else "jaxreplay quickstart", description=__doc__)
  p.add_argument("--workdir", default="runs/quickstart")
  p.add_argument("--config", default=None, help="experiment file (default: sweeps/quickstart.py in the package)")
  p.add_argument("--cache_dir", default=None, help="where the default data is built (default: "
                 "$JAXREPLAY_CACHE, $XDG_CACHE_HOME/jaxreplay or ~/.cache/jaxreplay)")
  p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's token budget (e.g. 0.1)")
  args = p.parse_args(argv[1:])
  if not args.scale > 0:
    p.error(f"--scale={args.scale} must be > 0 (e.g. 0.1 for a tenth of every token budget)")
  path = args.config or os.path.join(resolve.SWEEPS_DIR, "quickstart.py")
  module = resolve.experiment_file(path)
  workdirs = {}
  for arg, name in RUNS:
    c = resolve.experiment_config(f"{path}:{arg}", module)
    workdir = os.path.join(args.workdir, name)
    scaled = {"stop.tokens": str(int(c.stop.tokens * args.scale))} if c.stop.tokens else {}
    c = resolve.run_config(c, workdir, scaled, args.cache_dir, init_from=workdirs.get("pretrain"))
    print(f"== {name}: {c.stage} on {os.path.basename(c.data.path)}, {c.stop.tokens:,} tokens, "
          f"replay={c.replay.method}/{c.replay.source}", flush=True)
    training.run(c, workdir)
    workdirs[name] = workdir

  finetunes = {k: v for k, v in workdirs.items() if k != "pretrain"}
  table = report.matched_table(workdirs["pretrain"], finetunes)
  print(report.format_matched(table, "English", "Spanish"))
  plot = os.path.join(args.workdir, "quickstart.png")
  report.plot_trajectories(workdirs["pretrain"], finetunes, plot)
  write_json(os.path.join(args.workdir, "quickstart.json"), table)
  print(f"plot: {plot}")
  return 0

