"""The train-step benchmarks run end to end on a tiny model and print the JSON their readers expect (the
replay-cost and checkpoint ones, ~30 s each, are slow tests)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run(script: str, *args) -> dict:
  out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout[out.stdout.index("{"):])


def test_train_throughput():
  """The JSON's derived numbers follow from its measured ones: tokens/s from the step time, MFU from the
  paper's FLOPs per token (6 · matmul params + 12 · L · T · D, worked out here) and the measured peak."""
  out = run("train_throughput.py", "--sizes=tiny", "--steps=3")
  r = out["results"][0]
  D, L, T, B = (r[k] for k in ("d_model", "n_layers", "seq_len", "batch"))
  V = r["params_paper"] - 12 * L * D * D
  assert r["size"] == "tiny" and (D, L, T, B) == (32, 1, 16, 4) and V % D == 0
  V //= D
  assert r["tokens_per_s"] == pytest.approx(B * T / r["step_s"], rel=1e-3)
  flops = 6.0 * (12 * L * D * D + D * V) + 12.0 * L * T * D
  assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / out["matmul_peak_flops"], abs=1e-4)
  assert 0 < r["mfu"] < 1 and r["compile_s"] > 0 and out["matmul_peak_flops"] > 0


@pytest.mark.slow
def test_finetune_step_cost():
  r = run("finetune_step_cost.py", "--size=tiny", "--reps=2")
  cost = r["cost_vs_plain"]
  assert set(cost) == {"none", "kl", "kl_sampled_teacher", "kl_half_replay", "ntp", "replace",
                       "kl_self_replay_with_sampling"} and cost["none"] == 1.0
  assert all(v > 0.3 for v in cost.values())
  assert r["sampling_s"] > 0 and cost["kl_self_replay_with_sampling"] > cost["kl_sampled_teacher"]


@pytest.mark.slow
def test_checkpoint_overhead(tmp_path):
  r = run("checkpoint_overhead.py", "--sizes=tiny", "--steps=2", "--repeats=1")
  assert r["results"][0]["checkpoint_bytes"] > 0


def test_suite_runs_its_cpu_plan_and_its_accelerator_plan_names_real_sizes():
  """The suite's one JSON object on CPU (two short benchmarks): statuses, the peak measured twice, and each train
  size's MFU against the suite's peak recomputed from the benchmark's own. The accelerator plan, which no CI
  machine runs, names only scripts that exist and sizes benchmarks/common.py defines."""
  out = subprocess.run([sys.executable, os.path.join(BENCH, "suite.py"), "--only=train_throughput,data_throughput",
                        "--budget-s=200"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout)
  assert r["backend"] == "cpu" and set(r["benchmarks"]) == {"train_throughput", "data_throughput"}
  assert all(b["status"] == "ok" for b in r["benchmarks"].values()), r["benchmarks"]
  peak, train = r["matmul_peak"], r["benchmarks"]["train_throughput"]["result"]
  assert peak["flops"] > 0 and peak["flops_after"] > 0
  for row in train["results"]:
    assert row["mfu_vs_suite_peak"] == pytest.approx(row["mfu"] * train["matmul_peak_flops"] / peak["flops"], abs=1e-4)

  sys.path.insert(0, BENCH)
  try:
    import common
    import suite
  finally:
    sys.path.remove(BENCH)
  for name, script, args, cap in suite.PLANS["accelerator"]:
    assert os.path.exists(os.path.join(BENCH, script)) and cap > 0
    for a in args:
      if a.startswith(("--sizes=", "--size=")):
        assert set(a.split("=", 1)[1].split(",")) <= set(common.SIZES), (name, a)
  assert sum(cap for *_, cap in suite.PLANS["accelerator"]) <= 600  # every cap together fits one device call


def _repo_with_benchmark(root, value: int):
  """A git repository holding compare.py and a benchmark that prints a number from the tree's own package."""
  os.makedirs(root / "benchmarks")
  os.makedirs(root / "pkg")
  with open(os.path.join(BENCH, "compare.py")) as f:
    (root / "benchmarks" / "compare.py").write_text(f.read())
  (root / "benchmarks" / "fig.py").write_text(
      "import json, sys, pkg\nprint('noise before the JSON')\n"
      "print(json.dumps(dict(results=[dict(size=sys.argv[1], tokens_per_s=pkg.V, label='x')])))\n")
  (root / "pkg" / "__init__.py").write_text(f"V = {value}\n")
  env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t")
  for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "baseline"]):
    subprocess.run(["git", *cmd], cwd=root, check=True, env=env)


def test_compare_runs_each_tree_with_its_own_code(tmp_path):
  """The baseline revision prints V=2 from its own package, the working tree V=3: the ratio is exactly 1.5 in
  every round, each tree's values are its own, and the temporary worktree is gone afterwards."""
  _repo_with_benchmark(tmp_path, 2)
  (tmp_path / "pkg" / "__init__.py").write_text("V = 3\n")
  out = subprocess.run([sys.executable, "benchmarks/compare.py", "--baseline=HEAD", "--rounds=2", "fig small"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=""))
  assert out.returncode == 0, out.stderr
  r = json.loads(out.stdout)
  fig = r["benchmarks"]["fig small"]["HEAD"]["results.small.tokens_per_s"]
  assert fig == dict(this=[3.0, 3.0], baseline=[2.0, 2.0], ratio=1.5, ratio_min=1.5, ratio_max=1.5)
  assert r["rounds"] == 2 and r["this"]["dirty"] and len(r["load_avg_before"]) == 3
  worktrees = subprocess.run(["git", "worktree", "list"], cwd=tmp_path, capture_output=True, text=True).stdout
  assert len(worktrees.strip().splitlines()) == 1


def test_compare_names_a_bad_revision_and_a_missing_benchmark(tmp_path):
  _repo_with_benchmark(tmp_path, 2)
  for args, words in ((["--baseline=nope", "fig a"], "--baseline=nope is not a git revision"),
                      (["--baseline=HEAD", "nothere"], "benchmarks/nothere.py does not exist")):
    out = subprocess.run([sys.executable, "benchmarks/compare.py", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_paper_reference_names_a_checkout_that_is_not_the_papers(tmp_path):
  """The paper's code is fetched by the user, never vendored: a wrong --ref is one sentence and exit 2."""
  out = subprocess.run([sys.executable, os.path.join(BENCH, "paper_reference.py"), f"--ref={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "holds no train_single.py" in out.stderr, out.stderr


def test_compare_same_script_runs_this_trees_script_on_the_baselines_code(tmp_path):
  """A script new since the baseline (here: fig2.py, printing pkg.V · 10) runs against the baseline's package."""
  _repo_with_benchmark(tmp_path, 2)
  (tmp_path / "pkg" / "__init__.py").write_text("V = 5\n")
  (tmp_path / "benchmarks" / "fig2.py").write_text("import json, pkg\nprint(json.dumps(dict(v=pkg.V * 10)))\n")
  out = subprocess.run([sys.executable, "benchmarks/compare.py", "--baseline=HEAD", "--rounds=1", "--same-script",
                        "fig2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  fig = json.loads(out.stdout)["benchmarks"]["fig2"]["HEAD"]["v"]
  assert (fig["this"], fig["baseline"], fig["ratio"]) == ([50.0], [20.0], 2.5)


def test_step_time():
  r = run("step_time.py", "--sizes=tiny", "--steps=2")["results"][0]
  assert r["size"] == "tiny" and r["tokens_per_s_best"] >= r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0
