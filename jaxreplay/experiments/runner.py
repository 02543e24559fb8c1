"""Runs a sweep on one machine (or one multi-host slice): claims runs, trains them in dependency order.

Each job (a run, a pack or a chain; pack_runner.py) trains in its own process that holds its runs' flock claims (see
sweepdir.py): the lock dies with the process, so a killed runner's claims are released, and two runners never train
the same run at once; launchers (launch/) start one `python -m jaxreplay.experiments.runner worker ...` per run.
Workers get SIGTERM when their runner dies (train.run then checkpoints and exits), so starting the runner again
resumes every interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import jax

from jaxreplay import io, rundir
from jaxreplay.errors import SweepError, UsageError, UserError
from jaxreplay.experiments import multihost, packing
from jaxreplay.experiments import sweepcost as cost
from jaxreplay.experiments import sweeps, tpu_compile, tpu_sweep
from jaxreplay.experiments.sweepdir import (INHERITED, Claim, connect, dry_run, is_finished, is_locked, levels,  # noqa: F401 (re-exported)
                                load_runs, prepare, resolved_config, run_dir, select, status, sync)
from jaxreplay.experiments.sweeps import Run
from jaxreplay.experiments.pack_runner import (EXIT_CLAIMED, EXIT_WAITING, compile_cache_env, plan,
                                               recorded_pack, run_job)


class RunFailed(RuntimeError):
  """A run's worker process failed; the message ends with its last error line."""


def train_in_subprocess(workdir: str, name: str, cwd: str, *parents) -> dict:
  """Trains one run in a worker process and waits for it; for engines that place tasks (launch/ray_sweep.py).

  `parents` are the parents' results: an engine that passes them runs the parents first. A run claimed by
  another process is waited for.
  """
  env = dict(os.environ, **compile_cache_env(workdir, os.environ))
  while True:
    r = subprocess.run([sys.executable, "-m", "jaxreplay.experiments.runner", "worker", "--workdir", workdir, "--run", name],
                       cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode == EXIT_CLAIMED and not is_finished(workdir, name):
      time.sleep(2.0)
      continue
    if r.returncode not in (0, EXIT_CLAIMED):
      raise RunFailed(f"run {name} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    break
  return dict(name=name, **rundir.read_final(run_dir(workdir, name)))


# ----------------------------------------------------------------------------------------------- the loop

class LocalRunner:
  def __init__(self, workdir: str, runs: list[Run], fp: str, jobs: int = 1, devices: str = "",
               device_env: str = "CUDA_VISIBLE_DEVICES", pack: int = 1):
    """devices: accelerator ids split evenly over the jobs ("0,1,2,3" with jobs=2 → "0,1" and "2,3"), set in
    device_env for each worker; empty: every worker sees every device (on GPUs then without preallocation).
    pack: at most this many runs per process, as packs (experiments/packing.py) or chains; 1: a run each."""
    self.workdir, self.runs, self.fp, self.jobs = workdir, runs, fp, jobs
    self.pack = pack
    self.device_slots = device_slots(devices, jobs)
    self.device_env = device_env
    self.running: dict[str, tuple] = {}  # job key -> (process, claims, devices, names)
    self.failed: dict[str, str] = {}
    self.stop = False

  def say(self, msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

  def _start(self, job: dict, claims: list[Claim]):
    names = job["names"]
    for name in names:
      io.makedirs(run_dir(self.workdir, name))
    fds = [c.fd for c in claims]  # INHERITED for a lease: this process heartbeats it while the worker trains
    env = dict(os.environ, JAXREPLAY_PARENT_PID=str(os.getpid()), JAXREPLAY_LOCK_FDS=",".join(map(str, fds)))
    env.update(compile_cache_env(self.workdir, env))
    devices = None
    if self.device_slots:
      devices = self.device_slots.pop(0)
      env[self.device_env] = devices
    elif self.jobs > 1:  # several runs share the accelerators: no process may take most of their memory
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.makedirs(os.path.dirname(rundir.worker_log(self.workdir, names[0])), exist_ok=True)
    log = open(rundir.worker_log(self.workdir, names[0]), "ab")
    command = [sys.executable, "-m", "jaxreplay.experiments.pack_runner", "--workdir", self.workdir, "--runs",
               json.dumps(names), "--kind", job["kind"], "--pack", str(self.pack)]
    proc = subprocess.Popen(command, env=env, pass_fds=tuple(f for f in fds if f != INHERITED), stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    self.running[",".join(names)] = (proc, claims, devices, names)
    what = names[0] if len(names) == 1 else f"{job['kind']} of {len(names)}: {', '.join(names)}"
    self.say(f"start  {what} (pid {proc.pid}" + (f", devices {devices})" if devices else ")"))

  def _reap(self):
    for key, (proc, claims, devices, names) in list(self.running.items()):
      rc = proc.poll()
      if rc is None and any(c.lost() for c in claims):
        self.say(f"lease lost for {', '.join(names)} (taken over by another runner): stopping its worker")
        proc.terminate()
      if rc is None:
        continue
      for c in claims:
        c.close()
      if devices is not None:
        self.device_slots.append(devices)
      del self.running[key]
      if rc in (EXIT_CLAIMED, EXIT_WAITING):
        continue
      tail = _tail(rundir.worker_log(self.workdir, names[0]))
      for name in names:
        if is_finished(self.workdir, name):
          self.say(f"done   {name}")
        elif rc != 0 or len(names) > 1:
          self.failed[name] = tail
          self.say(f"FAILED {name} (exit {rc}): {tail}")

  def _terminate(self, *_):
    self.stop = True

  def _try_start(self, job: dict, done: set, blocked: set, waiting_on_others: set):
    bad = lambda n: n in self.failed or n in blocked
    recorded = job["kind"] == "pack" and any(recorded_pack(self.workdir, n) for n in job["names"])
    if recorded and any(bad(n) and n not in done for n in job["names"]):
      return  # a recorded pack trains whole or not at all (its checkpoint holds every member)
    names = job["names"] if recorded else [n for n in job["names"] if not bad(n)]
    if not names or all(n in done or is_finished(self.workdir, n) for n in names):
      return
    by_name = {r.name: r for r in self.runs}
    parents = [by_name[n].parent for n in names if n in by_name]
    if any(p and p not in done and not is_finished(self.workdir, p) for p in parents):
      return
    claims = [Claim(self.workdir, n) for n in names]
    for name in (n for n, c in zip(names, claims) if not c and n not in waiting_on_others):
      self.say(f"wait   {name} (another runner trains it)")
      waiting_on_others.add(name)
    if not all(claims) or all(is_finished(self.workdir, n) for n in names):  # or finished since our check
      for c in claims:
        c.close()
      return
    self._start(dict(job, names=names), claims)

  def loop(self) -> int:
    old = {s: signal.signal(s, self._terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    db = connect(self.workdir)
    waiting_on_others = set()
    try:
      jobs = plan(self.workdir, self.runs, sync(db, self.workdir, self.runs, self.fp), self.pack)
      while not self.stop:
        self._reap()
        done = sync(db, self.workdir, self.runs, self.fp)
        blocked = self._blocked()
        todo = [j for j in jobs if any(n not in done and n not in self.failed and n not in blocked
                                       and not is_finished(self.workdir, n) for n in j["names"])]
        busy = {n for *_, names in self.running.values() for n in names}
        if not todo and not self.running:
          break
        for job in todo:
          if len(self.running) >= self.jobs:
            break
          if any(n in busy for n in job["names"]):
            continue
          self._try_start(job, done, blocked, waiting_on_others)
        time.sleep(0.5)
    finally:
      for proc, *_ in self.running.values():
        proc.send_signal(signal.SIGTERM)
      for proc, claims, *_ in self.running.values():
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
        for c in claims:
          c.close()
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


def describe_plan(jobs: list[dict], configs: dict) -> str:
  packs = [j for j in jobs if j["kind"] == "pack"]
  chained = sum(len(j["names"]) for j in jobs if j["kind"] == "chain")
  idle = packing.planned_share([j["names"] for j in packs], configs)
  return (f"--pack: {sum(len(j['names']) for j in packs)} runs in {len(packs)} packs "
          f"(sizes {', '.join(str(len(j['names'])) for j in packs) or '-'}), {chained} runs chained, "
          f"{len(jobs)} processes in all; members idle after their stop: {idle:.0%} of the packs' member-steps "
          f"(at most {packing.MAX_IDLE_SHARE:.0%} a pack)")


def device_slots(devices: str, jobs: int) -> list[str]:
  ids = [d for d in devices.split(",") if d.strip()]
  if not ids:
    return []
  if len(ids) % jobs:
    raise SweepError(f"--devices={devices} lists {len(ids)} devices, which --jobs={jobs} does not divide: give "
                     "each job the same number of devices.")
  k = len(ids) // jobs
  return [",".join(ids[i * k:(i + 1) * k]) for i in range(jobs)]


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
  p.add_argument("--target", default=None,
                 help="with --dry-run: compile each distinct program for this TPU topology (e.g. v5e:2x2), name "
                      "the runs that do not fit (exit 2) and price the sweep in chip-hours; no --workdir needed")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help=f"with --dry-run: peak TFLOP/s per device for device-hours (default {cost.DEFAULT_PEAK_TFLOPS:g}: "
                      "H100 bf16 dense; with --target, its chip's)")
  p.add_argument("--mfu", type=float, default=cost.DEFAULT_MFU,
                 help="with --dry-run: model FLOPs utilization assumed for device-hours (default %(default)s)")
  p.add_argument("--status", action="store_true", help="show each run's state and final metrics")
  p.add_argument("--jobs", type=int, default=1, help="processes at once, each training a run, a pack or a chain")
  p.add_argument("--pack", type=int, default=None,
                 help="at most N runs per process: runs that differ only in per-member values (seed, LR, betas, "
                      "coefficients, length) train as one packed program, the others one after another "
                      "(default: the sweep file's, else 1)")
  p.add_argument("--extend", action="store_true",
                 help="accept a workdir whose recorded sweep lacks some of this definition's runs (runs only added)")
  p.add_argument("--only", default=None, help="glob(s) or substring(s), comma-separated; their parents run too")
  p.add_argument("--cache_dir", default=None, help="where default:LANG data is built (default: $JAXREPLAY_CACHE, "
                 "$XDG_CACHE_HOME/jaxreplay or ~/.cache/jaxreplay); every worker reads it")
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
  if a.target and not a.dry_run:
    raise UsageError(f"--target={a.target} compiles the sweep's programs without running them: add --dry-run.")
  if a.target:  # an unknown topology or missing libtpu: one sentence before the sweep is loaded
    a.target = tpu_compile.target(a.target)
  if a.peak_tflops is None:
    a.peak_tflops = a.target.chip.peak_bf16_flops / 1e12 if a.target else cost.DEFAULT_PEAK_TFLOPS
  if a.workdir is None and not a.target:
    raise UsageError("--workdir is required: name the directory of the sweep's runs (or use --variants).")
  if not a.peak_tflops > 0 or not 0 < a.mfu <= 1:
    raise UsageError(f"--peak_tflops={a.peak_tflops} must be > 0 and --mfu={a.mfu} in (0, 1].")
  if a.jobs < 1:
    raise UsageError(f"--jobs={a.jobs} must be ≥ 1.")
  if a.pack is not None and a.pack < 1:
    raise UsageError(f"--pack={a.pack} must be ≥ 1: the most runs one process trains together (1 turns packing off).")
  if a.status and not io.isdir(a.workdir):
    raise UsageError(f"--workdir={a.workdir} does not exist: give the directory a sweep was started in.")
  if a.cache_dir:  # the workers this process starts read it too
    os.environ["JAXREPLAY_CACHE"] = os.path.abspath(os.path.expanduser(a.cache_dir))
  return run_sweep(a)


def fit_check(runs: list[Run], tgt) -> int:
  """`--dry-run --target`: each distinct program compiled for the topology, and the roofline chip-hours;
  DoesNotFit (exit 2) naming the runs that do not fit."""
  result = tpu_sweep.compile_sweep(runs, tgt, log=lambda line: print(line, file=sys.stderr, flush=True))
  print(tpu_sweep.format_result(result, tgt.chips), flush=True)
  tpu_sweep.check_fits(result)
  return 0


def run_sweep(a) -> int:
  if a.target and a.workdir is None:  # no workdir: the runs as the file defines them, none done
    runs = select(sweeps.expand(sweeps.load(a.spec)), a.only)
    print(f"{len(runs)} runs in dependency order (no --workdir: none counted as done):")
    print(cost.format_costs(runs, a.peak_tflops, a.mfu))
    return fit_check(runs, a.target)
  workdir = io.abspath(a.workdir)
  readonly = a.dry_run or a.status
  sweep = sweeps.load(a.spec)
  runs, fp = prepare(a.spec, workdir, write=not readonly, only=None if a.status else a.only, extend=a.extend,
                     sweep=sweep)
  if a.status:
    print(status(workdir, runs))
    return 0
  runs = select(runs, a.only)
  pack = a.pack if a.pack is not None else int(getattr(sweep, "pack", 1) or 1)
  if a.dry_run:
    print(dry_run(workdir, runs))
    print(cost.format_costs(runs, a.peak_tflops, a.mfu))
    if pack > 1:
      configs = {r.name: resolved_config(workdir, r, planning=True) for r in runs}
      print(describe_plan(plan(workdir, runs, set(), pack), configs))
    return fit_check(runs, a.target) if a.target else 0
  if a.multihost:
    kw = {k: v for k, v in dict(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                process_id=a.process_id).items() if v is not None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no effect on TPU/GPU
    jax.distributed.initialize(**kw)
    return multihost.multihost_loop(workdir, runs, fp)
  return LocalRunner(workdir, runs, fp, a.jobs, devices=a.devices, device_env=a.device_env, pack=pack).loop()


def _variants_epilog(args: list[str]) -> str:
  """`jaxreplay sweep FILE --help` ends with FILE's variants."""
  files = [a.partition(":")[0] for a in args if not a.startswith("-") and a.partition(":")[0].endswith(".py")]
  try:
    return f"variants of {files[0]} (give one as FILE.py:ARG):\n" + sweeps.format_variants(files[0]) if files else ""
  except SweepError:  # a missing or broken file: the sweep command says what is wrong
    return ""


def _worker_main(argv: list[str]) -> int:
  """One run's process, as launch/ starts it: exit status 0 finished, 2 a user error, 3 (EXIT_CLAIMED) claimed
  by another process, 4 (EXIT_WAITING) its parent has not finished."""
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
  return run_job(a.workdir, [name])


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    try:
      sys.exit(_worker_main(sys.argv[2:]))
    except UserError as e:  # e.g. a run name the sweep does not hold: one sentence, exit 2
      print(f"jaxreplay: error: {e}", file=sys.stderr)
      sys.exit(2)
  sys.exit(main(["jaxreplay sweep"] + sys.argv[1:]))
