"""A side-by-side benchmark of this tree against git revisions: the guard on the hot path.

  python benchmarks/compare.py --baseline=REV [--baseline=REV2] [--rounds=3] [BENCHMARK ...]

A BENCHMARK is a script of benchmarks/ with its arguments in one shell word, e.g.
  "train_throughput --sizes=small,medium --steps=30"   (the default)
Each REV is checked out into a temporary git worktree. Every round runs each benchmark once from each tree,
this one first, then each baseline (A B A B ... in one window), each tree's script with PYTHONPATH set to its
own root so that it imports its own code. Every numeric figure of the benchmarks' JSON is printed for each tree,
with the ratio this/baseline per round, its median and its spread (min, max): on a noisy machine only ratios
of interleaved runs count. `--same-script` runs this tree's copy of each named script in every tree (copied
into the temporary worktree; the script must use only what the older benchmarks/common.py offers, as
step_time.py does). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as platform_mod
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEYS = ("size", "name", "kind", "mode", "method")  # a list item's identity, when it has one


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def git(*args, cwd=ROOT) -> str:
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def figures(obj, prefix: str = "") -> dict[str, float]:
  """Every number of a benchmark's JSON by its path, list items named by their `size`/`name`/... if any."""
  out = {}
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, list):
    items = [(next((str(x[k]) for k in KEYS if isinstance(x, dict) and k in x), str(i)), x)
             for i, x in enumerate(obj)]
  else:
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
      out[prefix] = float(obj)
    return out
  for key, value in items:
    out.update(figures(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def run_benchmark(tree: str, bench: list[str], timeout: float) -> dict:
  """One run of `bench` (script name and its arguments) from `tree`, importing that tree's code."""
  script = os.path.join(tree, "benchmarks", bench[0].removesuffix(".py") + ".py")
  if not os.path.exists(script):
    fail(f"{os.path.relpath(script, tree)} does not exist in {tree}; name a benchmark that both trees have.")
  env = dict(os.environ, PYTHONPATH=tree)
  out = subprocess.run([sys.executable, script, *bench[1:]], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=timeout)
  if out.returncode != 0:
    fail(f"{' '.join(bench)} failed in {tree}:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout[out.stdout.index("{"):])


def summarise(head: list[dict], base: list[dict], only: list[str]) -> dict:
  """Per figure: both trees' values by round, the per-round ratios head/base, their median and spread."""
  runs_h, runs_b = [figures(r) for r in head], [figures(r) for r in base]
  out = {}
  for path in runs_h[0]:
    if not all(path in r for r in runs_h + runs_b) or (only and not any(o in path for o in only)):
      continue
    h, b = [r[path] for r in runs_h], [r[path] for r in runs_b]
    ratios = [x / y for x, y in zip(h, b) if y != 0]
    out[path] = dict(this=h, baseline=b)
    if ratios:
      out[path].update(ratio=round(statistics.median(ratios), 4), ratio_min=round(min(ratios), 4),
                       ratio_max=round(max(ratios), 4))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--baseline", action="append", required=True, help="a git revision (repeat for several)")
  p.add_argument("--rounds", type=int, default=2, help="runs of each benchmark per tree, interleaved")
  p.add_argument("--timeout-s", type=float, default=1800, help="the most one benchmark run may take")
  p.add_argument("--same-script", action="store_true", help="run this tree's scripts against each revision's code")
  p.add_argument("--figures", default="", help="comma-separated parts of the figures' paths to keep (all: '')")
  p.add_argument("benchmarks", nargs="*", default=["train_throughput --sizes=small,medium --steps=30"])
  args = p.parse_args(argv)
  benches = [shlex.split(b) for b in args.benchmarks]
  only = [f for f in args.figures.split(",") if f]
  revs = {}
  for rev in args.baseline:
    try:
      revs[rev] = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
      fail(f"--baseline={rev} is not a git revision of {ROOT}; name a commit or branch.")
  tmp = tempfile.mkdtemp(prefix="jaxreplay_compare_")
  trees = {"this": ROOT}
  try:
    for i, (rev, sha) in enumerate(revs.items()):
      trees[rev] = os.path.join(tmp, f"tree{i}")
      git("worktree", "add", "--detach", trees[rev], sha)
      for bench in benches if args.same_script else ():
        name = bench[0].removesuffix(".py") + ".py"
        shutil.copy(os.path.join(HERE, name), os.path.join(trees[rev], "benchmarks", name))
    load_before = os.getloadavg()
    raw = {name: {tree: [] for tree in trees} for name in args.benchmarks}
    for _ in range(args.rounds):
      for name, bench in zip(args.benchmarks, benches):
        for tree, path in trees.items():
          raw[name][tree].append(run_benchmark(path, bench, args.timeout_s))
          print(json.dumps(dict(round=len(raw[name][tree]), tree=tree, benchmark=name, result=raw[name][tree][-1])),
                file=sys.stderr, flush=True)  # progress, and what a run cut short still has
    result = dict(
        this=dict(root=ROOT, commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain",
                                                                             "--untracked-files=no"))),
        baselines=revs, rounds=args.rounds, machine=platform_mod.node(), cpus=os.cpu_count(),
        load_avg_before=[round(x, 2) for x in load_before], load_avg_after=[round(x, 2) for x in os.getloadavg()],
        benchmarks={name: {rev: summarise(raw[name]["this"], raw[name][rev], only) for rev in revs} for name in raw})
    print(json.dumps(result, indent=1))
  finally:
    for rev, path in trees.items():
      if rev != "this" and os.path.exists(path):
        git("worktree", "remove", "--force", path)
    os.rmdir(tmp) if os.path.isdir(tmp) and not os.listdir(tmp) else None


if __name__ == "__main__":
  main()
