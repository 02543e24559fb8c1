"""Every `:small` sweep of sweeps/ run to the end through the real CLI, then `jaxreplay report` on it (slow).

`make sweeps-small` (or `make test-slow`) runs them one after the other. Each prints its wall time, and every
time is appended as one JSON line to $JAXREPLAY_SMALL_TIMES (default: small_times.jsonl in the test's temporary
directory). $JAXREPLAY_SMALL_ROOT keeps the workdirs (default: a temporary directory).
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sweep file → the figure `jaxreplay report` writes for that kind of experiment (instruct: its results table)
FIGURES = {
    "quickstart": "trajectories.png", "pretrain_length": "capacity_slices.png", "model_size": "capacity_slices.png",
    "grid_2d": "grid_2d.png", "capacity": "trajectories.png", "learning_rate": "learning_rate.png",
    "method_comparison": "method_comparison.png", "high_lr": "time_to_target.png",
    "toy_continual": "toy_continual.png", "batch_size_b2": "batch_size.png", "instruct": "results.md",
}
JOBS = int(os.environ.get("JAXREPLAY_SMALL_JOBS", "2"))


def _small_files():
  from jaxreplay.experiments import sweeps
  out = []
  for f in sorted(os.listdir(os.path.join(ROOT, "sweeps"))):
    if f.endswith(".py") and not f.startswith("_"):
      path = os.path.join(ROOT, "sweeps", f)
      if "small" in sweeps.variants(path):
        out.append(f[:-3])
  return out


def test_every_small_sweep_has_a_figure_to_check():
  assert set(_small_files()) == set(FIGURES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_small_sweep_runs_to_the_end_and_reports(name, tmp_path):
  base = os.environ.get("JAXREPLAY_SMALL_ROOT") or str(tmp_path)
  cwd = os.path.join(base, name)  # sweeps write data and assets under the directory they run from
  os.makedirs(cwd, exist_ok=True)
  workdir, out = os.path.join(cwd, "sweep"), os.path.join(cwd, "report")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cli = [sys.executable, "-m", "jaxreplay.cli"]
  start = time.time()
  r = subprocess.run(cli + ["sweep", os.path.join(ROOT, "sweeps", f"{name}.py:small"), f"--workdir={workdir}",
                            f"--jobs={JOBS}"], cwd=cwd, env=env, capture_output=True, text=True)
  wall = time.time() - start
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "failed" not in r.stdout.splitlines()[-1], r.stdout[-3000:]
  status = subprocess.run(cli + ["sweep", os.path.join(ROOT, "sweeps", f"{name}.py:small"), f"--workdir={workdir}",
                                 "--status"], cwd=cwd, env=env, capture_output=True, text=True)
  summary = status.stdout.strip().splitlines()[-1]
  assert summary.startswith(summary.split(" ")[0] + " done of") and "failed" not in summary, status.stdout
  rep = subprocess.run(cli + ["report", workdir, f"--out={out}"], cwd=cwd, env=env, capture_output=True, text=True)
  assert rep.returncode == 0, rep.stderr[-3000:]
  figure = os.path.join(out, FIGURES[name])
  assert os.path.exists(figure) and os.path.getsize(figure) > 1000, (figure, os.listdir(out))
  n_runs = int(summary.split(" ")[0])
  line = dict(sweep=f"{name}:small", runs=n_runs, jobs=JOBS, wall_s=round(wall, 1), figure=FIGURES[name])
  print(f"\n{name}:small: {n_runs} runs, 0 failed, {wall:.0f} s wall (--jobs={JOBS})")
  with open(os.environ.get("JAXREPLAY_SMALL_TIMES") or os.path.join(base, "small_times.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")
