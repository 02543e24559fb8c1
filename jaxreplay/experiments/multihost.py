"""Every host of a multi-host slice trains the same run at once, in this process (`jaxreplay sweep --multihost`)."""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxreplay.errors import UserError
from jaxreplay.experiments.pack_runner import train_one
from jaxreplay.experiments.sweepdir import Claim, connect, end_attempt, is_finished, start_attempt, sync
from jaxreplay.experiments.sweeps import Run


def multihost_loop(workdir: str, runs: list[Run], fp: str) -> int:
  """Every host of a slice trains the same run at once (in this process); host 0 claims and decides.

  A run that fails with a user error (the same on every host) is recorded and skipped with its descendants.
  """
  lead = jax.process_index() == 0
  db = connect(workdir) if lead else None
  failed: set[str] = set()
  claim = None

  def decide() -> str:
    nonlocal claim
    if not lead:
      return ""
    done = sync(db, workdir, runs, fp)
    for r in runs:  # dependency order: a failed run's descendants are skipped too
      if r.parent in failed:
        failed.add(r.name)
    todo = [r for r in runs if r.name not in done and r.name not in failed]
    if not todo:
      return "<done>"
    for run in todo:
      if run.parent and run.parent not in done:
        continue
      c = Claim(workdir, run.name)
      if c and not is_finished(workdir, run.name):
        claim = c
        return run.name
      c.close()
    return "<wait>"

  by_name = {r.name: r for r in runs}
  while True:
    msg = np.frombuffer(decide().encode().ljust(1024, b"\0"), np.uint8)
    name = bytes(multihost_utils.broadcast_one_to_all(msg)).rstrip(b"\0").decode()
    if name == "<done>":
      break
    if name == "<wait>":
      time.sleep(1.0)
      continue
    try:
      train_one(workdir, by_name[name], fp, db)
      if lead:
        print(f"done   {name} ({jax.process_count()} processes)", flush=True)
    except UserError as e:
      if lead:
        failed.add(name)
        end_attempt(db, start_attempt(db, name), "failed", str(e))
        print(f"FAILED {name}: {e}", flush=True)
    finally:
      if lead:
        claim.close()
  return 1 if failed else 0
