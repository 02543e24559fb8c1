#!/usr/bin/env python
"""Run a sweep on a Slurm cluster: one job array per dependency level, chained with --dependency.

  python launch/slurm.py sweeps/grid_2d.py --workdir=/shared/runs/grid_2d --partition=gpu --gpus=1 \\
      --max_parallel=32 --setup='source ~/jaxreplay/.venv/bin/activate' [--submit]

Writes WORKDIR/slurm/level{K}.sbatch (array task i trains the i-th run of level K: level 0 = runs that start
from nothing, level K+1 = runs that start from a level-K run) and WORKDIR/slurm/submit.sh; --submit runs it.
Each task runs `python -m jaxreplay.experiments.runner worker`, which claims its run with flock (a second copy of the
same task skips it), trains or resumes it, and adds its row to WORKDIR/results.sqlite. Slurm sends SIGTERM
two minutes before the time limit (--signal): the run checkpoints, and the requeued task resumes it. Finished
runs return at once, so resubmitting the whole sweep is safe. WORKDIR must be on a shared filesystem that
supports flock; `jaxreplay sweep FILE --workdir=WORKDIR --status` shows progress from any node.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxreplay import rundir  # noqa: E402
from jaxreplay.errors import ConfigError, SweepError  # noqa: E402
from jaxreplay.experiments import sweepdir  # noqa: E402


def sbatch_script(a, workdir: str, level: int, n: int) -> str:
  logs = os.path.join(workdir, "slurm", "logs")
  lines = ["#!/bin/bash", f"#SBATCH --job-name={a.job_name}-L{level}",
           f"#SBATCH --array=0-{n - 1}" + (f"%{a.max_parallel}" if a.max_parallel else ""),
           f"#SBATCH --output={logs}/L{level}_%A_%a.out", f"#SBATCH --time={a.time}",
           f"#SBATCH --cpus-per-task={a.cpus}", "#SBATCH --ntasks=1", "#SBATCH --requeue",
           "#SBATCH --signal=B:TERM@120"]
  if a.mem:
    lines.append(f"#SBATCH --mem={a.mem}")
  if a.gpus:
    lines.append(f"#SBATCH --gres=gpu:{a.gpus}")
  for flag in ("partition", "account", "qos"):
    if getattr(a, flag):
      lines.append(f"#SBATCH --{flag}={getattr(a, flag)}")
  lines += ["set -euo pipefail", f"cd {shlex.quote(a.cwd)}"]
  if a.setup:
    lines.append(a.setup)
  lines += [f"export JAX_COMPILATION_CACHE_DIR=${{JAX_COMPILATION_CACHE_DIR:-{os.path.join(workdir, rundir.JAX_CACHE)}}}",
            f"exec python -m jaxreplay.experiments.runner worker --workdir={shlex.quote(workdir)} --level={level} "
            "--index=$SLURM_ARRAY_TASK_ID", ""]
  return "\n".join(lines)


def generate(a) -> list[str]:
  """Validates the sweep (recording it in the workdir) and writes one sbatch script per level."""
  workdir = os.path.abspath(a.workdir)
  runs, _ = sweepdir.prepare(a.spec, workdir)
  os.makedirs(os.path.join(workdir, "slurm", "logs"), exist_ok=True)
  paths = []
  for level, names in enumerate(sweepdir.levels(runs)):
    path = os.path.join(workdir, "slurm", f"level{level}.sbatch")
    with open(path, "w") as f:
      f.write(sbatch_script(a, workdir, level, len(names)))
    paths.append(path)
  submit = ["#!/bin/bash", "set -euo pipefail", "prev="]
  for level, path in enumerate(paths):
    dep = '${prev:+--dependency=afterany:$prev}'
    submit.append(f"prev=$(sbatch --parsable {dep} {shlex.quote(path)} | cut -d';' -f1)")
    submit.append(f'echo "level {level}: job $prev"')
  with open(os.path.join(workdir, "slurm", "submit.sh"), "w") as f:
    f.write("\n".join(submit) + "\n")
  return paths


def submit(paths: list[str]) -> list[str]:
  """sbatch each level, each after the previous one (afterany: a failed run only blocks its own children)."""
  ids = []
  for path in paths:
    cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{ids[-1]}"] if ids else []) + [path]
    print("+ " + shlex.join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    ids.append(out.split(";")[0])
  return ids


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("spec", help="sweep file[:ARG]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--qos", default=None)
  p.add_argument("--gpus", type=int, default=1, help="GPUs per run (0: CPU only)")
  p.add_argument("--cpus", type=int, default=8)
  p.add_argument("--mem", default=None, help="e.g. 64G")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--max_parallel", type=int, default=0, help="array tasks running at once (0: no limit)")
  p.add_argument("--job_name", default="jaxreplay")
  p.add_argument("--setup", default=None, help="shell line run before the worker (activate the environment)")
  p.add_argument("--cwd", default=os.getcwd(), help="directory the tasks run in (relative data paths)")
  p.add_argument("--submit", action="store_true", help="submit the arrays now")
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    paths = generate(a)
  except (SweepError, ConfigError) as e:
    print(f"slurm.py: error: {e}", file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  if a.submit:
    ids = submit(paths)
    print("submitted: " + " ".join(ids))
  else:
    print(f"submit with: bash {os.path.join(os.path.abspath(a.workdir), 'slurm', 'submit.sh')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
