"""`jaxreplay quickstart`: the whole programme in minutes on a laptop CPU.

Pretrains a small model on English (King James Bible), finetunes it on Spanish (Reina-Valera 1909) without
replay and with self-generated KL replay, prints how much English each run forgot and plots the runs.
Every stage resumes if interrupted; a finished quickstart prints its table again at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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
  if args.config is not None and not os.path.isfile(args.config):
    p.error(f"--config file {args.config!r} does not exist: give an experiment file like sweeps/quickstart.py")

  from jaxreplay import config as config_lib, report, train
  from jaxreplay.data import DataError, resolve_path
  get_config = _load_experiment(args.config)
  workdirs = {}
  for arg, name in RUNS:
    c = get_config(arg)
    try:
      c.data.path = resolve_path(c.data.path, args.cache_dir)
    except DataError as e:
      print(f"jaxreplay: error: {e}", file=sys.stderr)
      return 2
    if c.stop.tokens:
      c.stop.tokens = int(c.stop.tokens * args.scale)
    workdir = os.path.join(args.workdir, name)
    if arg != "pretrain":
      c.init["from"] = workdirs["pretrain"]
    print(f"== {name}: {c.stage} on {os.path.basename(c.data.path)}, {c.stop.tokens:,} tokens, "
          f"replay={c.replay.method}/{c.replay.source}", flush=True)
    try:
      train.run(c, workdir)
    except (config_lib.ConfigError, ValueError, train.TrainingError) as e:
      print(f"jaxreplay: error: {e}", file=sys.stderr)
      return 2
    workdirs[name] = workdir

  table = report.forgetting_table(workdirs["pretrain"], {k: v for k, v in workdirs.items() if k != "pretrain"})
  print(report.format_table(table))
  plot = report.plot_trajectories(workdirs["pretrain"], {k: v for k, v in workdirs.items() if k != "pretrain"},
                                  os.path.join(args.workdir, "quickstart.png"))
  with open(os.path.join(args.workdir, "quickstart.json"), "w") as f:
    json.dump(table, f, indent=2)
  print(f"plot: {plot}")
  return 0


def _load_experiment(path: str | None):
  """The quickstart experiment file: sweeps/quickstart.py next to the package, or the one given."""
  import importlib.util
  if path is None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps", "quickstart.py")
  spec = importlib.util.spec_from_file_location("quickstart_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config
