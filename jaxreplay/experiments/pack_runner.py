"""Several runs in one process: a pack (trained as one program, train/pack.py) or a chain (one after another).

`jaxreplay sweep FILE --pack=N` plans the sweep's unfinished runs into jobs with experiments/packing.py and
starts one process per job (`python -m jaxreplay.experiments.pack_runner --workdir W --runs a,b --kind pack`).
The runner claims every run of a job before it starts (sweepdir's flock claims, inherited by the process), so
two runners never train a run twice. A pack records itself when it starts: DIR/packs/ID/pack.json and, in each
member's run dir, pack.json naming the pack; a restart trains those runs in that pack again, whatever --pack
says (its checkpoint holds every member), except --pack=1, which is refused while such a pack is unfinished.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import time

import jax

from jaxreplay import io, rundir
from jaxreplay.errors import SweepError, UserError
from jaxreplay.experiments import packing
from jaxreplay.experiments.sweepdir import (Claim, connect, end_attempt, is_finished, load_runs, record,
                                            resolved_config, run_dir, start_attempt)
from jaxreplay.experiments.sweeps import Run
from jaxreplay.train import loop as train, pack as pack_lib

MARKER = rundir.PACK
# A job's exit status besides 0 (trained or found finished) and 2 (a user error, said on stderr): its runs are
# claimed by another process (EXIT_CLAIMED), or each waits for a parent that has not finished (EXIT_WAITING).
EXIT_CLAIMED, EXIT_WAITING = 3, 4


def train_one(workdir: str, run: Run, fp: str, db=None) -> dict:
  """Trains one run in this process (every host of a multi-host slice calls it); host 0 records the result."""
  c = resolved_config(workdir, run)
  started = time.time()
  result = train.run(c, run_dir(workdir, run.name))
  if db is not None and jax.process_index() == 0:
    record(db, workdir, run, fp, started)
  return result


def die_with_parent():
  """SIGTERM this worker when the runner that started it (JAXREPLAY_PARENT_PID) dies (Linux), so its claims
  end with a checkpoint."""
  parent = os.environ.get("JAXREPLAY_PARENT_PID")
  if not parent:
    return
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    return
  if os.getppid() != int(parent):
    os.kill(os.getpid(), signal.SIGTERM)


def compile_cache_env(workdir: str, env) -> dict:
  """Runs of a sweep share shapes, so they share compiled steps: a persistent XLA cache in the workdir."""
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    return {}
  return dict(JAX_COMPILATION_CACHE_DIR=os.path.join(rundir.host_dir(workdir), rundir.JAX_CACHE),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


# ----------------------------------------------------------------------------------------------- planning

def recorded_pack(workdir: str, name: str) -> dict | None:
  path = os.path.join(run_dir(workdir, name), MARKER)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def plan(workdir: str, runs: list[Run], done: set[str], n: int) -> list[dict]:
  """Jobs for the unfinished runs: {kind: 'pack'|'chain', names}; recorded packs first as recorded."""
  todo = [r for r in runs if r.name not in done]
  jobs, taken = [], set()
  for r in todo:
    rec = recorded_pack(workdir, r.name)
    if rec is None or r.name in taken:
      continue
    if n == 1:
      raise SweepError(f"Run {r.name} was interrupted inside a pack of {len(rec['members'])} runs, whose checkpoint "
                       f"holds its progress: rerun with --pack={rec['pack']} to resume it.")
    jobs.append(dict(kind="pack", names=list(rec["members"])))
    taken.update(rec["members"])
  rest = [r for r in todo if r.name not in taken]
  if n == 1:
    return jobs + [dict(kind="chain", names=[r.name]) for r in rest]
  # A run that already trained alone resumes from its own checkpoints, alone.
  started_alone = {r.name for r in rest if io.isdir(rundir.checkpoints_dir(run_dir(workdir, r.name)))}
  configs = {r.name: resolved_config(workdir, r, planning=True) for r in rest if r.name not in started_alone}
  singles_by_stage: dict[str, list[str]] = {}
  stage_of = {r.name: r.stage for r in rest}
  for p in packing.group(configs, n) + [[name] for name in sorted(started_alone)]:
    if len(p) > 1:
      jobs.append(dict(kind="pack", names=p))
    else:
      singles_by_stage.setdefault(stage_of[p[0]], []).append(p[0])
  for names in singles_by_stage.values():
    jobs.extend(dict(kind="chain", names=c) for c in packing.chains(names, n))
  order = {r.name: i for i, r in enumerate(runs)}
  return sorted(jobs, key=lambda j: min(order[x] for x in j["names"]))


# ------------------------------------------------------------------------------------------------ workers

def train_recorded(db, workdir: str, run: Run, fp: str) -> int:
  """Trains the run, with an attempts row that says how it ended; 0: done, 2: a user error (said on stderr)."""
  attempt = start_attempt(db, run.name)
  try:
    train_one(workdir, run, fp, db)
  except UserError as e:
    end_attempt(db, attempt, "failed", str(e))
    print(f"jaxreplay: error: {run.name}: {e}", file=sys.stderr, flush=True)
    return 2
  except SystemExit as e:  # preempted: a checkpoint was saved
    end_attempt(db, attempt, "interrupted", str(e))
    raise
  except BaseException as e:
    end_attempt(db, attempt, "failed", f"{type(e).__name__}: {e}")
    raise
  end_attempt(db, attempt, "done")
  print(f"done   {run.name}", flush=True)
  return 0


def run_chain(db, workdir: str, runs: list[Run], fp: str) -> int:
  """Trains the runs one after another in this process; a failed run does not stop the next."""
  rc, waiting = 0, 0
  for run in runs:
    if is_finished(workdir, run.name):  # e.g. a resubmitted array task: record it (once) and train nothing
      record(db, workdir, run, fp)
    elif run.parent and not is_finished(workdir, run.parent):
      print(f"run {run.name} waits for {run.parent}, which has not finished", file=sys.stderr)
      waiting += 1
    else:
      rc = max(rc, train_recorded(db, workdir, run, fp))
  return EXIT_WAITING if waiting == len(runs) else rc


def run_packed(db, workdir: str, members: list[Run], fp: str, n: int) -> int:
  """Trains the runs as one pack; each member is recorded (or fails) on its own."""
  waiting = [r.name for r in members if r.parent and not is_finished(workdir, r.parent)]
  if waiting:
    print(f"pack waits for the parents of {', '.join(waiting)}", file=sys.stderr)
    return EXIT_WAITING
  names = [r.name for r in members]
  directory = os.path.join(workdir, rundir.PACKS, packing.pack_id(names))
  for r in members:
    os.makedirs(run_dir(workdir, r.name), exist_ok=True)
    with open(os.path.join(run_dir(workdir, r.name), MARKER), "w") as f:
      json.dump(dict(members=names, pack=n, dir=directory), f)
  started = time.time()
  attempts = {r.name: start_attempt(db, r.name) for r in members if not is_finished(workdir, r.name)}
  configs = [resolved_config(workdir, r) for r in members]
  try:
    results = pack_lib.run_pack(configs, [run_dir(workdir, name) for name in names], directory)
  except SystemExit as e:
    for a in attempts.values():
      end_attempt(db, a, "interrupted", str(e))
    raise
  except UserError as e:  # the whole pack cannot train
    for a in attempts.values():
      end_attempt(db, a, "failed", str(e))
    print(f"jaxreplay: error: {e}", file=sys.stderr, flush=True)
    return 2
  rc = 0
  for r, result in zip(members, results):
    if isinstance(result, BaseException):
      end_attempt(db, attempts[r.name], "failed", str(result))
      print(f"jaxreplay: error: {r.name}: {result}", file=sys.stderr, flush=True)
      rc = 2
      continue
    record(db, workdir, r, fp, started)
    if r.name in attempts:
      end_attempt(db, attempts[r.name], "done")
    print(f"done   {r.name}", flush=True)
  return rc


def run_job(workdir: str, names: list[str], kind: str = "chain", pack: int = 0) -> int:
  """Trains a job's runs in this process, a chain or a pack (`pack`: the --pack that planned it, recorded),
  under claims on every run: those the runner passed down (JAXREPLAY_LOCK_FDS), or its own."""
  workdir = io.abspath(workdir)
  die_with_parent()
  runs, fp = load_runs(workdir)
  by_name = {r.name: r for r in runs}
  for name in names:
    if name not in by_name:
      raise SweepError(f"Run {name!r} is not part of the sweep in {workdir}: see `jaxreplay sweep FILE "
                       "--dry-run`.")
  inherited = [int(fd) for fd in os.environ.get("JAXREPLAY_LOCK_FDS", "").split(",") if fd]
  claims = [Claim(workdir, name, inherited[i] if i < len(inherited) else None, wait_s=2.0)
            for i, name in enumerate(names)]
  try:
    if not all(claims):
      print(f"{', '.join(names)}: being trained by another process; skipped", file=sys.stderr)
      return EXIT_CLAIMED
    with contextlib.closing(connect(workdir)) as db:
      if kind == "chain":
        return run_chain(db, workdir, [by_name[n] for n in names], fp)
      return run_packed(db, workdir, [by_name[n] for n in names], fp, pack or len(names))
  finally:
    for c in claims:
      c.close()


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreplay.experiments.pack_runner")
  p.add_argument("--workdir", required=True)
  p.add_argument("--runs", required=True, help="the run names, a JSON list (names may hold commas)")
  p.add_argument("--kind", choices=("pack", "chain"), default="pack")
  p.add_argument("--pack", type=int, default=0, help="the --pack value that planned this job (recorded)")
  a = p.parse_args(argv)
  return run_job(a.workdir, json.loads(a.runs), a.kind, a.pack)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
