#!/usr/bin/env python
"""Run a sweep on a Cloud TPU slice: queued resources (spot), install on every worker, start the sweep on
every worker, and re-create the slice when it is preempted (runs resume from their checkpoints).

  python launch/tpu.py up      --name=sweep1 --zone=us-central2-b --accelerator=v4-32 [--project=P] [--no-spot]
                               [--sweep=sweeps/grid_2d.py [--target=v4:2x2x4] [--no-fit-check]]
  python launch/tpu.py install --name=sweep1 --zone=... [--package='jaxreplay @ git+https://...']
  python launch/tpu.py run     --name=sweep1 --zone=... --sweep=sweeps/grid_2d.py --workdir=/mnt/runs/grid_2d
  python launch/tpu.py watch   --name=sweep1 --zone=... --accelerator=v4-32 --sweep=... --workdir=...
  python launch/tpu.py status|down --name=sweep1 --zone=...

Two ways to use a slice (--mode):
  multihost  every host runs `jaxreplay sweep --multihost`; `jax.distributed.initialize()` joins them and the
             slice trains one run at a time over all its chips (large models, e.g. the 205M comparison);
  hosts      every host is an independent runner (`--jobs=N`) on its own chips; runs are claimed with flock
             in the shared workdir (many small runs, e.g. the 13 × 13 grid).
The workdir must be on storage every host sees with working flock (Filestore/NFS); mount it with
--setup (run on every worker after installing). gcsfuse does not support flock.

Given --sweep, `up` first compiles each distinct program of the sweep for the slice's topology on
this machine (`jaxreplay sweep SWEEP --dry-run --target=TOPOLOGY`, no TPU needed; libtpu must be installed here)
and requests no slice when a run does not fit, unless --no-fit-check.

`watch` is the unattended loop: create the queued resource if missing, re-create it when the slice is
preempted or the request failed, install and (re)start the sweep on every worker, and stop when worker 0
reports every run done (`--down_when_done` then deletes the slice). A sweep that stops with failed runs is
restarted (retrying them) at most --max_retries times, then reported, and watch exits 1. Every step is idempotent.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REMOTE_DIR = "~/jaxreplay"
PID_FILE = "~/jaxreplay-sweep.pid"
LOG_FILE = "~/jaxreplay-sweep.log"
DEAD_STATES = ("FAILED", "SUSPENDED", "SUSPENDING")  # queued-resource states that need a new request
READY = "ACTIVE"


class Gcloud:
  """Runs (or, with dry_run, only prints) gcloud commands; every command names project and zone."""

  def __init__(self, a, dry_run=False):
    self.a, self.dry_run = a, dry_run
    self.where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

  def __call__(self, *args, check=True, capture=False) -> str:
    cmd = ["gcloud", *args, *self.where]
    print("+ " + shlex.join(cmd), flush=True)
    if self.dry_run:
      return ""
    r = subprocess.run(cmd, check=False, text=True, capture_output=capture)
    if check and r.returncode:
      raise SystemExit(f"gcloud failed (exit {r.returncode}): {shlex.join(cmd)}\n{(r.stderr or '')[-2000:]}")
    return (r.stdout or "").strip()

  def ssh(self, command: str, worker: str = "all", check=True, capture=False) -> str:
    return self(*"compute tpus tpu-vm ssh".split(), self.a.name, f"--worker={worker}", f"--command={command}",
                check=check, capture=capture)


def qr_name(a) -> str:
  return f"{a.name}-qr"


def state(g: Gcloud) -> str:
  """The queued resource's state ('' when it does not exist), or PREEMPTED when its node was preempted."""
  a = g.a
  s = g(*"compute tpus queued-resources describe".split(), qr_name(a), "--format=value(state.state)",
        check=False, capture=True)
  if s == READY:
    node = g(*"compute tpus tpu-vm describe".split(), a.name, "--format=value(state)", check=False, capture=True)
    if node == "PREEMPTED":
      return "PREEMPTED"
  return s


# chips per topology shape: v5e/v6e count chips in the accelerator type, v4/v5p TensorCores (2 a chip)
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}


def topology(accelerator: str) -> str | None:
  """The topology name libtpu compiles for (v5e:2x2) of a Cloud TPU accelerator type (v5litepod-4); None if unknown."""
  kind, _, n = accelerator.rpartition("-")
  if not n.isdigit():
    return None
  n = int(n)
  if kind in ("v5litepod", "v5e", "v6e") and n in SHAPES_2D:
    return f"{'v6e' if kind == 'v6e' else 'v5e'}:{SHAPES_2D[n]}"
  if kind in ("v4", "v5p") and n // 2 in SHAPES_3D:
    return f"{kind}:{SHAPES_3D[n // 2]}"
  return None


def fit_check(a):
  """Refuses (exit 2, one sentence) a sweep with a run that does not fit the slice, before any slice is requested."""
  tgt = a.target or topology(a.accelerator)
  if tgt is None:
    raise SystemExit(f"launch/tpu.py: error: no topology is known for --accelerator={a.accelerator}: give it as "
                     "--target (e.g. v5e:4x4), or skip the fit check with --no-fit-check.")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "jaxreplay.cli", "sweep", a.sweep, "--dry-run", f"--target={tgt}"]
  print("+ " + shlex.join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True, capture_output=True)
  print(r.stdout, end="", flush=True)
  if r.returncode:
    errors = [l for l in r.stderr.splitlines() if l.startswith("jaxreplay: error:")]
    why = errors[-1][len("jaxreplay: error: "):] if errors else r.stderr.strip()[-1500:]
    print(f"launch/tpu.py: error: the sweep {a.sweep} failed its fit check on {tgt}, so no slice was requested: "
          f"{why} (--no-fit-check requests it anyway)", file=sys.stderr, flush=True)
    raise SystemExit(2)


def up(g: Gcloud, check=True):
  a = g.a
  args = [*"compute tpus queued-resources create".split(), qr_name(a), f"--node-id={a.name}",
          f"--accelerator-type={a.accelerator}", f"--runtime-version={a.runtime}"]
  if a.spot:
    args.append("--spot")
  g(*args, check=check)


def down(g: Gcloud):
  g(*"compute tpus queued-resources delete".split(), qr_name(g.a), "--force", "--quiet", check=False)


def wait_ready(g: Gcloud, timeout_s: float, poll_s: float) -> bool:
  end = time.time() + timeout_s
  while time.time() < end:
    s = state(g)
    if s == READY:
      return True
    if s in DEAD_STATES or s == "PREEMPTED":
      return False
    time.sleep(poll_s)
  return False


def install(g: Gcloud):
  """The package (a pip spec, or this checkout's committed tree) and jax[tpu] on every worker."""
  a = g.a
  setup = f" && {a.setup}" if a.setup else ""
  if a.package:
    g.ssh(f"pip install -U 'jax[tpu]' {shlex.quote(a.package)} && mkdir -p {REMOTE_DIR}{setup}")
    return
  tarball = os.path.join("/tmp", f"jaxreplay-{a.name}.tar.gz")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  print(f"+ git archive --format=tar.gz -o {tarball} HEAD", flush=True)
  if not g.dry_run:
    subprocess.run(["git", "archive", "--format=tar.gz", "-o", tarball, "HEAD"], cwd=root, check=True)
  g(*"compute tpus tpu-vm scp".split(), tarball, f"{a.name}:~/jaxreplay.tar.gz", "--worker=all")
  g.ssh(f"mkdir -p {REMOTE_DIR} && tar -xzf ~/jaxreplay.tar.gz -C {REMOTE_DIR} && "
        f"pip install -U 'jax[tpu]' -e {REMOTE_DIR}{setup}")


def sweep_command(a) -> str:
  cmd = ["python", "-m", "jaxreplay.cli", "sweep", a.sweep, f"--workdir={a.workdir}"]
  cmd += ["--multihost"] if a.mode == "multihost" else [f"--jobs={a.jobs}"]
  return shlex.join(cmd)


def run(g: Gcloud):
  """Starts the sweep on every worker unless it is already running there (a pid file per worker)."""
  start = (f"cd {REMOTE_DIR} && if [ -f {PID_FILE} ] && kill -0 $(cat {PID_FILE}) 2>/dev/null; then "
           f"echo already running; else setsid nohup {sweep_command(g.a)} >> {LOG_FILE} 2>&1 < /dev/null & "
           f"echo $! > {PID_FILE}; fi")
  g.ssh(start)


def sweep_status(g: Gcloud) -> dict[str, int]:
  """The last line of `sweep --status` on worker 0 as counts, e.g. {"done": 2, "failed": 1, "runs": 3}."""
  a = g.a
  out = g.ssh(f"cd {REMOTE_DIR} && python -m jaxreplay.cli sweep {shlex.quote(a.sweep)} "
              f"--workdir={shlex.quote(a.workdir)} --status | tail -n 1", worker="0", check=False, capture=True)
  counts, total = out.rpartition(" of ")[::2]  # "2 done, 1 failed of 3 runs"
  pairs = [p.split() for p in counts.split(",")] + [total.split()]
  return {p[1]: int(p[0]) for p in pairs if len(p) == 2 and p[0].isdigit()}


def stopped(g: Gcloud) -> bool:
  """Whether the sweep process on worker 0 has exited (it leaves failed runs to the next start)."""
  out = g.ssh(f"if [ -f {PID_FILE} ] && kill -0 $(cat {PID_FILE}) 2>/dev/null; then echo running; else echo stopped; "
              "fi", worker="0", check=False, capture=True)
  return out.strip() == "stopped"


def watch(g: Gcloud, max_cycles: int | None = None):
  a, cycles, retries = g.a, 0, 0
  while max_cycles is None or cycles < max_cycles:
    cycles += 1
    s = state(g)
    if s in DEAD_STATES or s == "PREEMPTED":
      print(f"slice {a.name} is {s}: re-creating it; runs resume from their checkpoints", flush=True)
      down(g)
      s = ""
    if s == "":
      up(g, check=False)  # a deletion still in progress makes this fail; the next cycle retries
    if s != READY:
      if not wait_ready(g, a.ready_timeout_s, a.poll_s):
        continue
      install(g)
    counts = sweep_status(g)
    if counts.get("runs") and counts.get("done") == counts["runs"]:
      print(f"sweep {a.sweep} finished in {a.workdir}", flush=True)
      if a.down_when_done:
        down(g)
      return 0
    if counts.get("failed") and stopped(g):  # each start retries the failed runs: a bounded number of times
      if retries == a.max_retries:
        print(f"sweep {a.sweep}: {counts['failed']} of {counts['runs']} runs failed again after {retries} retries; "
              f"`jaxreplay sweep {a.sweep} --workdir={a.workdir} --status` lists them, each run's log says why",
              flush=True)
        return 1
      retries += 1
    run(g)
    if max_cycles is None or cycles < max_cycles:
      time.sleep(a.poll_s)
  return 1


def parse(argv):
  p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=("up", "install", "run", "watch", "status", "down"))
  p.add_argument("--name", required=True, help="TPU VM name (the queued resource is NAME-qr)")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--accelerator", default="v4-8", help="e.g. v4-32, v5litepod-16, v6e-8")
  p.add_argument("--runtime", default="tpu-ubuntu2204-base", help="TPU software version")
  p.add_argument("--no-spot", dest="spot", action="store_false", help="on-demand instead of spot")
  p.add_argument("--package", default=None, help="pip spec to install; default: this checkout's HEAD")
  p.add_argument("--setup", default=None, help="shell run on every worker after installing (mount the workdir)")
  p.add_argument("--sweep", default=None, help="sweep file[:ARG], relative to the repository root")
  p.add_argument("--workdir", default=None, help="sweep workdir on storage shared by every worker")
  p.add_argument("--mode", choices=("multihost", "hosts"), default="multihost")
  p.add_argument("--jobs", type=int, default=1, help="--mode=hosts: runs per host at once")
  p.add_argument("--poll_s", type=float, default=60.0)
  p.add_argument("--ready_timeout_s", type=float, default=3600.0)
  p.add_argument("--down_when_done", action="store_true")
  p.add_argument("--max_retries", type=int, default=2, help="watch: restarts of a sweep that stopped with failed runs")
  p.add_argument("--dry_run", action="store_true", help="print the gcloud commands; run nothing")
  p.add_argument("--target", default=None, help="the topology the fit check compiles for (default: the "
                 "accelerator's, e.g. v5litepod-16 → v5e:4x4)")
  p.add_argument("--no-fit-check", "--force", dest="fit_check", action="store_false",
                 help="up: request the slice even when a run of --sweep does not fit it")
  a = p.parse_args(argv)
  if a.action in ("run", "watch") and not (a.sweep and a.workdir):
    p.error(f"{a.action} needs --sweep and --workdir")
  return a


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  g = Gcloud(a, a.dry_run)
  if a.action == "up" and a.sweep and a.fit_check:
    fit_check(a)
  if a.action == "up":
    if state(g) in ("", *DEAD_STATES, "PREEMPTED"):
      up(g)
  elif a.action == "install":
    install(g)
  elif a.action == "run":
    run(g)
  elif a.action == "watch":
    return watch(g)
  elif a.action == "status":
    print(state(g) or "absent")
  elif a.action == "down":
    down(g)
  return 0


if __name__ == "__main__":
  sys.exit(main())
