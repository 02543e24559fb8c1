#!/usr/bin/env python
"""Run a sweep on a Ray cluster: one Ray task per run, with the resources a run needs, after its parent.

  python launch/ray_sweep.py sweeps/grid_2d.py --workdir=/shared/runs/grid_2d --address=auto --gpus=1
  python launch/ray_sweep.py sweeps/quickstart.py:small --workdir=runs/qs --address=local --cpus=1

Ray is the engine here because it already does what a sweep needs beyond one machine: placing tasks by
resources (CPUs, GPUs, TPU chips or custom resources), retrying tasks whose node died, and ordering tasks by
passing the parent's result to the child. Each task runs the run in its own process
(`python -m jaxreplay.experiments.runner worker`), which claims it with flock, resumes it from its checkpoints, and adds
its row to WORKDIR/results.sqlite; the workdir must be on storage every node sees. A run whose parent failed
is reported, not started. Finished runs return at once, so starting the same command again is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxreplay.errors import ConfigError, SweepError  # noqa: E402
from jaxreplay.experiments import runner, sweepdir  # noqa: E402


def run_sweep(spec: str, workdir: str, cpus: float = 1, gpus: float = 0, resources: dict | None = None,
              only: str | None = None, address: str | None = None, ray_init: dict | None = None) -> dict:
  """Submits every run as a Ray task in dependency order; returns {name: final metrics or the error}."""
  import ray  # lazy: the optional `ray` extra
  workdir = os.path.abspath(workdir)
  runs, fp = sweepdir.prepare(spec, workdir)  # validates everything before any task starts
  runs = sweepdir.select(runs, only)
  if not ray.is_initialized():
    ray.init(address=None if address in (None, "local") else address, **(ray_init or {}))
  task = ray.remote(runner.train_in_subprocess).options(num_cpus=cpus, num_gpus=gpus, resources=resources or {},
                                                 max_retries=2, retry_exceptions=False)
  refs = {}
  for run in runs:  # parents first: a child's task takes its parent's ObjectRef, so Ray starts it after
    parents = [refs[run.parent]] if run.parent in refs else []
    refs[run.name] = task.remote(workdir, run.name, os.getcwd(), *parents)
  out = {}
  for name, ref in refs.items():
    try:
      out[name] = ray.get(ref)
    except Exception as e:  # the run's own failure, or its parent's (Ray re-raises it in the child)
      out[name] = dict(name=name, error=str(e).strip().splitlines()[-1][:500])
  db = sweepdir.connect(workdir)
  sweepdir.sync(db, workdir, runs, fp)
  db.close()
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="launch/ray_sweep.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("spec", help="sweep file[:ARG]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--address", default="auto", help="Ray cluster address; 'local' starts a local Ray")
  p.add_argument("--cpus", type=float, default=1, help="CPUs per run")
  p.add_argument("--gpus", type=float, default=0, help="GPUs per run")
  p.add_argument("--resources", default="{}", help='custom resources per run as JSON, e.g. {"TPU": 4}')
  p.add_argument("--only", default=None)
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    out = run_sweep(a.spec, a.workdir, a.cpus, a.gpus, json.loads(a.resources), a.only, a.address)
  except (SweepError, ConfigError) as e:
    print(f"ray_sweep: error: {e}", file=sys.stderr)
    return 2
  print(sweepdir.status(os.path.abspath(a.workdir), sweepdir.load_runs(os.path.abspath(a.workdir))[0]))
  failed = [n for n, r in out.items() if "error" in r]
  for n in failed:
    print(f"FAILED {n}: {out[n]['error']}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
