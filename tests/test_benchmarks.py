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
