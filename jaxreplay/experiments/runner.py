"""Runs a sweep on one machine (or one multi-host slice): claims runs, trains them in dependency order.

Each run trains in its own process (`python -m jaxreplay.experiments.runner worker ...`) that holds the run's flock
claim (see sweepdir.py): the lock dies with the process, so a killed runner's claims are released, and two
runners never train the same run at once. Workers get SIGTERM when their runner dies (train.run then
checkpoints and exits), so starting the runner again resumes every interrupted run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

from jaxreplay.errors import SweepError, UsageError, UserError
from jaxreplay.experiments import sweepcost as cost
from jaxreplay.experiments import sweeps
from jaxreplay.experiments.sweepdir import (Claim, connect, dry_run, is_finished, is_locked, levels,  # noqa: F401 (re-exported)
                                load_runs, prepare, record, resolved_config, run_dir, select, status, sync)
from jaxreplay.experiments.sweeps import Run

EXIT_CLAIMED, EXIT_WAITING = 3, 4


def _die_with_parent(parent_pid: int):
  """SIGTERM this worker when the runner that started it dies (Linux), so its claim ends with a checkpoint."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    return
  if os.getppid() != parent_pid:
    os.kill(os.getpid(), signal.SIGTERM)


def train_one(workdir: str, run: Run, fp: str, db=None) -> dict:
  """Trains one run in this process (every host of a multi-host slice calls it); host 0 records the result."""
  import jax
  c = resolved_config(workdir, run)
  started = time.time()
  from jaxreplay.train import loop as train
  result = train.run(c, run_dir(workdir, run.name))
  if db is not None and jax.process_index() == 0:
    record(db, workdir, run, fp, started)
  return result


def worker(workdir: str, name: str) -> int:
  """Entry point of one run's process; exit status 0 finished, 2 user error, 3 claimed elsewhere, 4 waiting."""
  runs, fp = load_runs(workdir)
  by_name = {r.name: r for r in runs}
  if name not in by_name:
    raise SweepError(f"Run {name!r} is not part of the sweep in {workdir}: see `jaxreplay sweep FILE --dry-run`.")
  run = by_name[name]
  if os.environ.get("JAXREPLAY_PARENT_PID"):
    _die_with_parent(int(os.environ["JAXREPLAY_PARENT_PID"]))
  inherited = os.environ.get("JAXREPLAY_LOCK_FD")
  claim = Claim(workdir, name, int(inherited) if inherited else None, wait_s=2.0)
  if not claim:
    print(f"run {name} is being trained by another process; skipping it", file=sys.stderr)
    return EXIT_CLAIMED
  db = connect(workdir)
  if is_finished(workdir, name):  # e.g. a resubmitted array task: record it (once) and train nothing
    record(db, workdir, run, fp)
    return 0
  if run.parent and not is_finished(workdir, run.parent):
    print(f"run {name} waits for {run.parent}, which has not finished", file=sys.stderr)
    return EXIT_WAITING
  attempt = db.execute("INSERT INTO attempts (name, host, pid, started, status) VALUES (?,?,?,?,?)",
                       (name, socket.gethostname(), os.getpid(), time.time(), "running")).lastrowid
  status, message = "failed", ""
  try:
    result = train_one(workdir, run, fp, db)
    status = "done"
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    return 0
  except UserError as e:
    message = str(e)
    print(f"jaxreplay: error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # preempted: a checkpoint was saved
    status, message = "interrupted", str(e)
    raise
  except BaseException as e:
    message = f"{type(e).__name__}: {e}"[:2000]
    raise
  finally:
    db.execute("UPDATE attempts SET ended=?, status=?, message=? WHERE id=?", (time.time(), status, message, attempt))
    db.close()
    claim.close()


class RunFailed(RuntimeError):
  """A run's worker process failed; the message ends with its last error line."""


def train_in_subprocess(workdir: str, name: str, cwd: str, *parents) -> dict:
  """Trains one run in a worker process and waits for it; for engines that place tasks (launch/ray_sweep.py).

  `parents` are the parents' results: an engine that passes them runs the parents first. A run claimed by
  another process is waited for.
  """
  env = dict(os.environ)
  env.update(compile_cache_env(workdir, env))
  while True:
    r = subprocess.run([sys.executable, "-m", "jaxreplay.experiments.runner", "worker", "--workdir", workdir, "--run", name],
                       cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode == EXIT_CLAIMED and not is_finished(workdir, name):
      time.sleep(2.0)
      continue
    if r.returncode not in (0, EXIT_CLAIMED):
      raise RunFailed(f"run {name} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    break
  with open(os.path.join(run_dir(workdir, name), "final.json")) as f:
    return dict(name=name, **json.load(f))


# ----------------------------------------------------------------------------------------------- the loop

class LocalRunner:
  def __init__(self, workdir: str, runs: list[Run], fp: str, jobs: int = 1, poll_s: float = 0.5, quiet=False,
               devices: str = "", device_env: str = "CUDA_VISIBLE_DEVICES"):
    """devices: accelerator ids split evenly over the jobs ("0,1,2,3" with jobs=2 → "0,1" and "2,3"), set in
    device_env for each worker; empty: every worker sees every device (on GPUs then without preallocation)."""
    self.workdir, self.runs, self.fp, self.jobs, self.poll_s, self.quiet = workdir, runs, fp, jobs, poll_s, quiet
    self.device_slots = device_slots(devices, jobs)
    self.device_env = device_env
    self.running: dict[str, tuple[subprocess.Popen, Claim]] = {}
    self.failed: dict[str, str] = {}
    self.stop = False

  def say(self, msg):
    if not self.quiet:
      print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

  def _start(self, run: Run, claim: Claim):
    d = run_dir(self.workdir, run.name)
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ, JAXREPLAY_LOCK_FD=str(claim.fd), JAXREPLAY_PARENT_PID=str(os.getpid()))
    env.update(compile_cache_env(self.workdir, env))
    devices = None
    if self.device_slots:
      devices = self.device_slots.pop(0)
      env[self.device_env] = devices
    elif self.jobs > 1:  # several runs share the accelerators: no process may take most of their memory
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    log = open(os.path.join(d, "worker.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "jaxreplay.experiments.runner", "worker", "--workdir", self.workdir,
                             "--run", run.name], env=env, pass_fds=(claim.fd,), stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    self.running[run.name] = (proc, claim, devices)
    self.say(f"start  {run.name} (pid {proc.pid}" + (f", devices {devices})" if devices else ")"))

  def _reap(self):
    for name, (proc, claim, devices) in list(self.running.items()):
      rc = proc.poll()
      if rc is None:
        continue
      claim.close()
      if devices is not None:
        self.device_slots.append(devices)
      del self.running[name]
      if rc == 0:
        self.say(f"done   {name}")
      elif rc not in (EXIT_CLAIMED, EXIT_WAITING):
        tail = _tail(os.path.join(run_dir(self.workdir, name), "worker.log"))
        self.failed[name] = tail
        self.say(f"FAILED {name} (exit {rc}): {tail}")

  def _terminate(self, *_):
    self.stop = True

  def loop(self) -> int:
    old = {s: signal.signal(s, self._terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    db = connect(self.workdir)
    waiting_on_others = set()
    try:
      while not self.stop:
        self._reap()
        done = sync(db, self.workdir, self.runs, self.fp)
        blocked = self._blocked()
        todo = [r for r in self.runs if r.name not in done and r.name not in self.failed and r.name not in blocked]
        if not todo and not self.running:
          break
        for run in todo:
          if len(self.running) >= self.jobs:
            break
          if run.name in self.running or (run.parent and run.parent not in done):
            continue
          claim = Claim(self.workdir, run.name)
          if not claim:
            if run.name not in waiting_on_others:
              self.say(f"wait   {run.name} (another runner trains it)")
              waiting_on_others.add(run.name)
            continue
          if is_finished(self.workdir, run.name):  # finished between our check and our claim
            claim.close()
            continue
          self._start(run, claim)
        time.sleep(self.poll_s)
    finally:
      for name, (proc, *_) in self.running.items():
        proc.send_signal(signal.SIGTERM)
      for name, (proc, claim, _) in self.running.items():
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
        claim.close()
      for s, h in old.items():
        signal.signal(s, h)
      done = sync(db, self.workdir, self.runs, self.fp)
      db.close()
    if self.stop:
      self.say(f"stopped: {len(done)}/{len(self.runs)} runs finished; run the same command to resume")
      return 130
    blocked = self._blocked()
    self.say(f"{len(done)}/{len(self.runs)} runs finished" + (f", {len(self.failed)} failed" if self.failed else "")
             + (f", {len(blocked)} not started because a run they start from failed" if blocked else ""))
    return 1 if self.failed else 0

  def _blocked(self) -> set[str]:
    bad = set(self.failed)
    out = set()
    for r in self.runs:  # dependency order: parents first
      if r.parent and r.parent in bad:
        bad.add(r.name)
        out.add(r.name)
    return out


def device_slots(devices: str, jobs: int) -> list[str]:
  ids = [d for d in devices.split(",") if d.strip()]
  if not ids:
    return []
  if len(ids) % jobs:
    raise SweepError(f"--devices={devices} lists {len(ids)} devices, which --jobs={jobs} does not divide: give "
                     "each job the same number of devices.")
  k = len(ids) // jobs
  return [",".join(ids[i * k:(i + 1) * k]) for i in range(jobs)]


def compile_cache_env(workdir: str, env) -> dict:
  """Runs of a sweep share shapes, so they share compiled steps: a persistent XLA cache in the workdir."""
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    return {}
  return dict(JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _tail(path: str, n: int = 300) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, 2)
      f.seek(max(0, f.tell() - 4000))
      lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
  except OSError:
    return ""
  errs = [l for l in lines if "error" in l.lower()]
  return (errs or lines or [""])[-1][-n:]


def multihost_loop(workdir: str, runs: list[Run], fp: str, poll_s: float = 1.0) -> int:
  """Every host of a slice trains the same run at once (in this process); host 0 claims and decides.

  A run that fails with a user error (the same on every host) is recorded and skipped with its descendants.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  lead = jax.process_index() == 0
  db = connect(workdir) if lead else None
  failed: set[str] = set()
  claim = None

  def decide() -> str:
    nonlocal claim
    if not lead:
      return ""
    done = sync(db, workdir, runs, fp)
    todo = [r for r in runs if r.name not in done and r.name not in failed and r.parent not in failed]
    for r in todo:
      if r.parent in failed:
        failed.add(r.name)
    todo = [r for r in todo if r.name not in failed]
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
      time.sleep(poll_s)
      continue
    try:
      train_one(workdir, by_name[name], fp, db)
      if lead:
        print(f"done   {name} ({jax.process_count()} processes)", flush=True)
    except UserError as e:
      if lead:
        failed.add(name)
        db.execute("INSERT INTO attempts (name, host, pid, started, ended, status, message) VALUES (?,?,?,?,?,?,?)",
                   (name, socket.gethostname(), os.getpid(), time.time(), time.time(), "failed", str(e)))
        print(f"FAILED {name}: {e}", flush=True)
    finally:
      if lead:
        claim.close()
  return 1 if failed else 0


def main(argv: list[str]) -> int:
  prog = argv[0] if argv else "jaxreplay sweep"
  p = argparse.ArgumentParser(prog=prog, description="Run a sweep file's grid: dependency order, skip finished runs, "
                              "resume interrupted ones, one results table.", epilog=_variants_epilog(argv[1:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("spec", help="sweep file and argument, e.g. sweeps/pretrain_length.py:small")
  p.add_argument("--workdir", default=None, help="directory of the sweep's runs, locks and results table")
  p.add_argument("--variants", action="store_true", help="list the sweep file's variants (its :ARGs); run nothing")
  p.add_argument("--dry-run", "--dry_run", action="store_true",
                 help="validate and list the runs with their parent, shape, length and FLOPs; run nothing")
  p.add_argument("--peak_tflops", type=float, default=cost.DEFAULT_PEAK_TFLOPS,
                 help="with --dry-run: peak TFLOP/s per device for device-hours (default %(default)s: H100 bf16 dense)")
  p.add_argument("--mfu", type=float, default=cost.DEFAULT_MFU,
                 help="with --dry-run: model FLOPs utilization assumed for device-hours (default %(default)s)")
  p.add_argument("--status", action="store_true", help="show each run's state and final metrics")
  p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
  p.add_argument("--only", default=None, help="glob(s) or substring(s), comma-separated; their parents run too")
  p.add_argument("--devices", default="", help="accelerator ids to split over the jobs, e.g. 0,1,2,3 (GPUs)")
  p.add_argument("--device_env", default="CUDA_VISIBLE_DEVICES",
                 help="variable that gives each worker its devices (TPU: TPU_VISIBLE_CHIPS)")
  p.add_argument("--multihost", action="store_true",
                 help="every process of a multi-host slice runs this; jax.distributed.initialize() joins them")
  p.add_argument("--coordinator", default=None, help="multi-host without auto-detection: HOST:PORT of process 0")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  a = p.parse_args(argv[1:])
  if a.variants:
    print(sweeps.format_variants(a.spec.partition(":")[0]))
    return 0
  if a.workdir is None:
    raise UsageError("--workdir is required: name the directory of the sweep's runs (or use --variants).")
  if not a.peak_tflops > 0 or not 0 < a.mfu <= 1:
    raise UsageError(f"--peak_tflops={a.peak_tflops} must be > 0 and --mfu={a.mfu} in (0, 1].")
  if a.jobs < 1:
    raise UsageError(f"--jobs={a.jobs} must be ≥ 1.")
  workdir = os.path.abspath(a.workdir)
  readonly = a.dry_run or a.status
  runs, fp = prepare(a.spec, workdir, write=not readonly, only=None if a.status else a.only)
  if a.status:
    print(status(workdir, runs))
    return 0
  runs = select(runs, a.only)
  if a.dry_run:
    print(dry_run(workdir, runs))
    print(cost.format_costs(runs, cost.PricingAssumptions(a.peak_tflops, a.mfu)))
    return 0
  if a.multihost:
    import jax
    kw = {k: v for k, v in dict(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                process_id=a.process_id).items() if v is not None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no effect on TPU/GPU
    jax.distributed.initialize(**kw)
    return multihost_loop(workdir, runs, fp)
  return LocalRunner(workdir, runs, fp, a.jobs, devices=a.devices, device_env=a.device_env).loop()


def _variants_epilog(args: list[str]) -> str:
  """`jaxreplay sweep FILE --help` ends with FILE's variants."""
  files = [a.partition(":")[0] for a in args if not a.startswith("-") and a.partition(":")[0].endswith(".py")]
  if not files or not os.path.exists(files[0]):
    return ""
  try:
    return f"variants of {files[0]} (give one as FILE.py:ARG):\n" + sweeps.format_variants(files[0])
  except SweepError:
    return ""


def _worker_main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreplay.experiments.runner worker")
  p.add_argument("--workdir", required=True)
  p.add_argument("--run", default=None, help="run name")
  p.add_argument("--level", type=int, default=None, help="with --index: the index-th run of this dependency level")
  p.add_argument("--index", type=int, default=None)
  a = p.parse_args(argv)
  name = a.run
  if name is None:
    runs, _ = load_runs(a.workdir)
    name = levels(runs)[a.level][a.index]
  return worker(os.path.abspath(a.workdir), name)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    try:
      sys.exit(_worker_main(sys.argv[2:]))
    except UserError as e:  # e.g. a run name the sweep does not hold: one sentence, exit 2
      print(f"jaxreplay: error: {e}", file=sys.stderr)
      sys.exit(2)
  sys.exit(main(["jaxreplay sweep"] + sys.argv[1:]))
