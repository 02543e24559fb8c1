"""A sweep's workdir (its layout: jaxreplay/rundir.py): the recorded definition (a different one is refused), the
results table (SQLite, WAL; rebuilt from final.json files if lost), per-run flock claims, progress.

A run is finished when its final.json exists (train.run writes it last, atomically); the table is a
queryable copy of those files, so a crash between the two loses nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import fnmatch
import json
import os
import socket
import sqlite3
import time

import ml_collections

from jaxreplay import config as config_lib, io, rundir
from jaxreplay.io.lease import Lease, read_holder
from jaxreplay.io import write_json
from jaxreplay.rundir import run_dir
from jaxreplay.experiments import resolve, sweeps
from jaxreplay.experiments.sweeps import Run, SweepError

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (name TEXT PRIMARY KEY, stage TEXT, parent TEXT, overrides TEXT, config TEXT,
  metrics TEXT, started REAL, finished REAL, host TEXT, fingerprint TEXT);
CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, host TEXT, pid INTEGER,
  started REAL, ended REAL, status TEXT, message TEXT);
"""


# A runner killed on an object store frees its runs this long after its last heartbeat (tests shorten it).
LEASE_TTL_S = float(os.environ.get("JAXREPLAY_LEASE_TTL_S", "120"))
INHERITED = -1  # Claim.fd of a worker whose runner holds the lease (and heartbeats it) for it


def results_file(workdir: str) -> str:
  return os.path.join(rundir.host_dir(workdir), rundir.RESULTS)


def connect(workdir: str) -> sqlite3.Connection:
  os.makedirs(rundir.host_dir(workdir), exist_ok=True)
  db = sqlite3.connect(results_file(workdir), timeout=120, isolation_level=None)
  db.execute("PRAGMA journal_mode=WAL")
  db.execute("PRAGMA synchronous=NORMAL")
  db.executescript(SCHEMA)
  return db


def start_attempt(db, name: str) -> int:
  """A row in the attempts table for this process training the run; `end_attempt` says how it ended."""
  return db.execute("INSERT INTO attempts (name, host, pid, started, status) VALUES (?,?,?,?,?)",
                    (name, socket.gethostname(), os.getpid(), time.time(), "running")).lastrowid


def end_attempt(db, attempt: int, status: str, message: str = ""):
  db.execute("UPDATE attempts SET ended=?, status=?, message=? WHERE id=?", (time.time(), status, message[:2000],
                                                                             attempt))


def prepare(spec: str, workdir: str, write: bool = True, only: str | None = None,
            extend: bool = False, sweep: sweeps.Sweep | None = None) -> tuple[list[Run], str]:
  """Loads, expands and validates the sweep (and checks that `only` selects some run) before writing anything;
  checks (and records) that the workdir holds this sweep, or, with `extend`, this sweep with runs added to the
  one recorded (none removed or changed, so every recorded result stays valid). Returns every run, not only the
  selected ones. `sweep`: spec's Sweep, when already loaded."""
  runs = sweeps.expand(sweep or sweeps.load(spec))
  select(runs, only)
  fp = sweeps.fingerprint(runs)
  path = io.join(workdir, rundir.SWEEP)
  rewrite = not io.exists(path)
  if not rewrite:
    old = io.read_json(path)
    if old["fingerprint"] != fp:
      change = _describe_change(old["runs"], runs, allow_added=extend)
      if change:
        hint = "" if extend else " (or --extend, when runs were only added)"
        raise SweepError(f"The workdir {workdir} holds results of a different sweep definition ({change}; it was "
                         f"made from {old.get('spec')!r}): use a new --workdir{hint}, or restore the definition that made "
                         "it.")
      rewrite = True  # only settings that do not change results (logging, checkpointing, new default keys)
  if write and rewrite:
    io.makedirs(workdir)
    runs_json = [dataclasses.asdict(r) for r in runs]
    write_json(path, dict(fingerprint=fp, spec=spec, created=time.time(), runs=runs_json), indent=1)
  if write:
    io.makedirs(io.join(workdir, rundir.LOCKS))
    connect(workdir).close()
  return runs, fp


IGNORED = ("log", "checkpoint", "data.num_workers", "data.prefetch")  # keys that do not change a run's numbers


def _describe_change(old_runs: list[dict], runs: list[Run], allow_added: bool = False) -> str:
  """What differs between a recorded sweep and this one ('' when nothing that changes results does; added runs
  do not count with allow_added)."""
  old = {r["name"]: r for r in old_runs}
  new = {r.name: r for r in runs}
  added = [n for n in new if n not in old and not allow_added]
  removed = [n for n in old if n not in new]
  changed, keys = [], []
  for n in new:
    if n not in old:
      continue
    a, b = old[n], new[n]
    if a["parent"] != b.parent:
      changed.append(n)
      continue
    diff = config_lib.differences(ml_collections.ConfigDict(a["config"]), ml_collections.ConfigDict(b.config),
                                  ignore=IGNORED)
    if diff:
      changed.append(n)
      keys.extend(k for k in diff if k not in keys)
  parts = [f"{len(x)} run{'s' * (len(x) != 1)} {w}, e.g. {x[0]!r}" for x, w in ((added, "added"), (removed, "removed"),
                                                           (changed, "changed")) if x]
  if keys:
    parts[-1] += f" ({', '.join(keys[:4])} differ)"
  return "; ".join(parts)


def load_runs(workdir: str) -> tuple[list[Run], str]:
  path = io.join(workdir, rundir.SWEEP)
  if not io.exists(path):
    raise SweepError(f"{workdir} holds no {rundir.SWEEP}: start the sweep with `jaxreplay sweep FILE --workdir=...`.")
  data = io.read_json(path)
  return [Run(**r) for r in data["runs"]], data["fingerprint"]


def resolved_config(workdir: str, run: Run, planning: bool = False) -> ml_collections.ConfigDict:
  """The run's config through the one entrance, init.from pointing at the parent's workdir (`planning`: for a plan
  made before the parents trained)."""
  init_from = run_dir(workdir, run.parent) if run.parent else None
  return resolve.run_config(run.config, run_dir(workdir, run.name), init_from=init_from, planning=planning)


def is_finished(workdir: str, name: str) -> bool:
  return rundir.is_finished(run_dir(workdir, name))


def record(db, workdir: str, run: Run, fp: str, started: float | None = None):
  """Adds the finished run's row (once; a second call changes nothing)."""
  d = run_dir(workdir, run.name)
  metrics = rundir.read_final(d)
  cfg_path = rundir.config_file(d)
  cfg = io.read_text(cfg_path) if io.exists(cfg_path) else json.dumps(run.config)
  db.execute("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?)",
             (run.name, run.stage, run.parent, json.dumps(run.overrides, sort_keys=True, default=str), cfg,
              json.dumps(metrics, sort_keys=True), started, io.mtime(rundir.final_file(d)),
              socket.gethostname(), fp))
  if started is not None:  # a runner's sync may have added the row first, without the start time
    db.execute("UPDATE results SET started=? WHERE name=? AND started IS NULL", (started, run.name))


def sync(db, workdir: str, runs: list[Run], fp: str) -> set[str]:
  """Names of finished runs; adds rows for any finished run the table misses (a worker killed in between)."""
  rows = {n for (n,) in db.execute("SELECT name FROM results")}
  for run in runs:
    if run.name not in rows and is_finished(workdir, run.name):
      record(db, workdir, run, fp)
      rows.add(run.name)
  return {r.name for r in runs if r.name in rows}


def refresh(workdir: str) -> str:
  """The path of the sweep's results table, first brought up to date with its final.json files. On an object
  store the table is this host's cache (host_dir), which another host's runs fill only through this sync."""
  runs, fp = load_runs(workdir)
  db = connect(workdir)
  try:
    sync(db, workdir, runs, fp)
  finally:
    db.close()
  return results_file(workdir)


class Claim:
  """An exclusive flock on a run's lock file; released when closed or when every holder process dies. On an object
  store (no flock), a lease object instead, heartbeated from a thread of this process while it is held: a killed
  runner's runs are taken over once its lease expires (LEASE_TTL_S)."""

  def __init__(self, workdir: str, name: str, fd: int | None = None, wait_s: float = 0.0):
    """wait_s: keep trying that long (a status probe holds a lock for an instant)."""
    self.fd, self.lease = fd, None
    if fd is None and io.is_url(workdir):
      self.lease = Lease(rundir.lease_file(workdir, name), LEASE_TTL_S)
      if self.lease.try_acquire():
        self._alive = self.lease.kept_alive()
        self._alive.__enter__()
        self.fd = INHERITED
    elif fd is None:
      path = rundir.lock_file(workdir, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      end = time.monotonic() + wait_s
      while True:
        try:
          fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if time.monotonic() >= end:
            os.close(self.fd)
            self.fd = None
            break
          time.sleep(0.05)

  def __bool__(self):
    return self.fd is not None

  def lost(self) -> bool:
    """A lease that expired (heartbeats held up) and was taken over: its worker must stop writing the run."""
    return self.lease is not None and self.lease.generation is None and self.fd is not None

  def close(self):
    if self.lease is not None and self.fd is not None:
      self._alive.__exit__(None, None, None)  # stops the heartbeats and deletes the lease
    elif self.fd is not None and self.fd != INHERITED:
      os.close(self.fd)
    self.fd = None


def is_locked(workdir: str, name: str) -> bool:
  if io.is_url(workdir):
    holder = read_holder(rundir.lease_file(workdir, name))
    return holder is not None and not holder.expired()
  claim = Claim(workdir, name)
  held = not claim
  claim.close()
  return held


def select(runs: list[Run], only: str | None) -> list[Run]:
  """Runs whose name matches ONLY (a glob, or a substring), with every run they start from."""
  if not only:
    return runs
  pats = [p for p in only.split(",") if p]
  hit = lambda n: any(fnmatch.fnmatchcase(n, p) if any(ch in p for ch in "*?[") else p in n for p in pats)
  by_name = {r.name: r for r in runs}
  keep = set()
  for r in runs:
    if hit(r.name):
      n = r.name
      while n and n not in keep:
        keep.add(n)
        n = by_name[n].parent
  if not keep:
    raise SweepError(f"--only={only!r} matches no run: see the names with --dry-run.")
  return [r for r in runs if r.name in keep]


def levels(runs: list[Run]) -> list[list[str]]:
  """Run names grouped by depth (0: runs that start from nothing; k: runs whose parent is at depth k-1)."""
  depth = {}
  for r in runs:
    depth[r.name] = depth[r.parent] + 1 if r.parent else 0
  out = [[] for _ in range(max(depth.values()) + 1)] if depth else []
  for r in runs:
    out[depth[r.name]].append(r.name)
  return out


def status(workdir: str, runs: list[Run]) -> str:
  rows, failed = {}, set()
  if io.is_url(workdir):  # this host's cache of the bucket's final.json objects, filled before it is read
    refresh(workdir)
  if os.path.exists(results_file(workdir)):
    db = connect(workdir)
    rows = {n: json.loads(m) for n, m in db.execute("SELECT name, metrics FROM results")}
    failed = {n for n, st in db.execute(
        "SELECT name, status FROM attempts WHERE id IN (SELECT MAX(id) FROM attempts GROUP BY name)") if st == "failed"}
    db.close()
  counts = collections.Counter()
  width = max([len(r.name) for r in runs] + [4])
  lines = [f"{'run':<{width}}  {'state':<8}  {'stop':<11}  {'valid_ntp':>9}  {'prev_ntp':>9}  {'tokens':>12}"]
  for r in runs:
    m = rows.get(r.name)
    if m is None and is_finished(workdir, r.name):
      m = rundir.read_final(run_dir(workdir, r.name))
    if m is not None:
      state = "done"
    elif io.isdir(io.join(workdir, rundir.LOCKS)) and is_locked(workdir, r.name):
      state = "running"
      holder = read_holder(rundir.lease_file(workdir, r.name)) if io.is_url(workdir) else None
      if holder is not None:  # on an object store: who holds it, and since when
        state = f"running on {holder.describe()}"
    elif r.name in failed:
      state = "failed"
    elif io.isdir(rundir.checkpoints_dir(run_dir(workdir, r.name))):
      state = "partial"
    else:
      state = "pending"
    counts[state] += 1
    m = m or {}
    num = lambda k: f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "-"
    lines.append(f"{r.name:<{width}}  {state:<8}  {str(m.get('stop_reason', '-')):<11}  {num('valid_ntp'):>9}  "
                 f"{num('prev_ntp'):>9}  {m.get('tokens', '-'):>12}")
  lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {len(runs)} runs")
  return "\n".join(lines)


def dry_run(workdir: str, runs: list[Run]) -> str:
  """The header of `--dry-run`: how many runs each stage has and how many are done (sweepcost lists them)."""
  stages = collections.Counter(r.stage for r in runs)
  done = sum(is_finished(workdir, r.name) for r in runs)
  return (f"{len(runs)} runs in dependency order (" + ", ".join(f"{n} {s}" for s, n in stages.items()) + ")"
          + (f", {done} already done" if done else "") + ":")

