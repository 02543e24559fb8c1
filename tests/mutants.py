"""`make mutants`: deliberate bugs that the fast suite must catch.

Each mutant is a textual patch (a small unique snippet of a module and its replacement) and the fast tests that
should fail with it. In turn, each is applied to a copy of the tree (tracked and untracked-but-not-ignored files,
in a temporary directory) and its tests run there (`-m "not slow"`, stopping at the first failure). A mutant whose
tests fail is caught; one whose tests pass is MISSED (write a test for it). A snippet that no longer appears once
(a module was refactored) is reported as `anchor not found` / `anchor ambiguous`: update the list, do not skip it.

  python tests/mutants.py                 every mutant against the current tests
  python tests/mutants.py --only a,b      some of them
  python tests/mutants.py --before=REV    the tests of REV (e.g. the commit before a test change) against the same
                                          bugs, with each mutant's `before` selection: how many the old suite caught
  python tests/mutants.py --clean         first check that every selection passes on the unmutated copy
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
  before: tuple[str, ...] = ()  # the tests that covered this code before tests/test_eval_reference.py & co.
  alt: tuple[tuple[str, str], ...] = ()  # other (old, new) spellings of the same bug, tried in turn (refactors)

  def patches(self):
    return ((self.old, self.new), *self.alt)


E2E = ("tests/test_train.py", "-k", "pretraining_learns or target_loss_stops or finetune_with_real_kl")

MUTANTS = [
    Mutant("doubled eval loss", "jaxreplay/train/evaluation.py",
           'out[f"{name}_ntp"] = float(sums["nll"] / count)', 'out[f"{name}_ntp"] = float(2 * sums["nll"] / count)',
           ("tests/test_eval_reference.py",), E2E),
    Mutant("doubled eval KL", "jaxreplay/train/evaluation.py",
           'out[f"{name}_kl"] = float(sums["kl"] / count)', 'out[f"{name}_kl"] = float(2 * sums["kl"] / count)',
           ("tests/test_eval_reference.py",), E2E),
    Mutant("second half off by one", "jaxreplay/train/steps.py",
           "half = w_BT.at[:, :w_BT.shape[1] // 2].set(0.0)", "half = w_BT.at[:, :w_BT.shape[1] // 2 + 1].set(0.0)",
           ("tests/test_eval_reference.py",), E2E),
    Mutant("accuracy against the current token", "jaxreplay/train/steps.py",
           "== tokens[:, 1:]).astype(jnp.float32)", "== tokens[:, :-1]).astype(jnp.float32)",
           ("tests/test_eval_reference.py",), ("tests/test_train.py", "tests/test_train_chat.py", "-k",
                                              "pretraining_learns or end_to_end_kl")),
    Mutant("dropped eval mask", "jaxreplay/train/steps.py",
           'w_BT = (jnp.ones(nll_BT.shape, jnp.float32) if batch["mask"] is None else',
           'w_BT = (jnp.ones(nll_BT.shape, jnp.float32) if True else',
           ("tests/test_eval_reference.py",), ("tests/test_train_chat.py", "-k", "end_to_end_kl")),
    Mutant("flipped KL sign in the objective", "jaxreplay/train/steps.py",
           "loss = ntp + coeff * reg", "loss = ntp - coeff * reg",
           ("tests/test_train_chat.py", "-k", "end_to_end_kl"),
           ("tests/test_train_chat.py", "tests/test_train_chat_replay.py", "-k", "end_to_end_kl or regularise")),
    Mutant("prev_ntp_delta sign flipped", "jaxreplay/evals/forgetting.py",
           'out["prev_ntp_delta"] = result["prev_ntp"] - prev_final["valid_ntp"]',
           'out["prev_ntp_delta"] = prev_final["valid_ntp"] - result["prev_ntp"]',
           ("tests/test_eval_reference.py", "-k", "forgetting"), ("tests/test_evaluate.py", *E2E)),
    Mutant("dropped compute dtype", "jaxreplay/models/decoder.py",
           "dtype=jnp.dtype(dtype)", 'dtype=jnp.dtype("float32")',
           ("tests/test_bf16.py", "-k", "multiplies or compute_dtype or differ"),
           ("tests/test_bf16.py", "tests/test_platform.py", "-k", "bf16 or tpu_choice")),
    Mutant("the run ignores config.model.compute_dtype", "jaxreplay/train/stage.py",
           "dtype = config_lib.compute_dtype_name(c, jax.default_backend())", 'dtype = "float32"',
           ("tests/test_bf16.py", "-k", "compute_dtype"), ("tests/test_bf16.py", "tests/test_config.py", "-k", "dtype")),
    Mutant("data order off by one after resume", "jaxreplay/train/loop.py",
           "batch_iter = stage.batches.iterate(t.step)", "batch_iter = stage.batches.iterate(t.step + (t.step > 0))",
           ("tests/test_train_chat.py", "-k", "ci_size"),
           ("tests/test_train_chat.py", "tests/test_train.py", "-k", "resume"),
           alt=(("batches.iterate(self.step)", "batches.iterate(self.step + (self.step > 0))"),)),
    Mutant("optimizer state not restored", "jaxreplay/train/loop.py",
           "    t.state, t.extra = restored\n",
           '    t.state, t.extra = dict(restored[0], opt_state=t.state["opt_state"]), restored[1]\n',
           ("tests/test_train_chat.py", "-k", "ci_size"),
           ("tests/test_train_chat.py", "tests/test_train.py", "-k", "resume"),
           alt=(("    state, extra = restored\n",
                 '    state, extra = dict(restored[0], opt_state=state["opt_state"]), restored[1]\n'),)),
    Mutant("replay batch never used", "jaxreplay/train/steps.py",
           "replay_logits = decoder.logits(model_cfg, params, replay_BT)",
           'replay_logits = decoder.logits(model_cfg, params, batch["tokens"])',
           ("tests/test_train_chat_replay.py",), ("tests/test_train_chat_replay.py",)),
    Mutant("status shows a failed run as pending", "jaxreplay/experiments/sweepdir.py",
           'state = "failed"', 'state = "pending"',
           ("tests/test_sweep_paths.py", "-k", "status"), ("tests/test_sweeps.py", "-k", "status")),
    Mutant("--devices not given to the worker", "jaxreplay/experiments/runner.py",
           "env[self.device_env] = devices", "env[self.device_env + '_UNUSED'] = devices",
           ("tests/test_sweep_paths.py", "-k", "devices"), ("tests/test_sweeps.py", "-k", "device")),
    Mutant("matched loss: the lowest instead of one every run reached", "jaxreplay/experiments/results_table.py",
           "return max(reached) if reached else None", "return min(reached) if reached else None",
           ("tests/test_report.py", "-k", "matched"), ("tests/test_report.py", "-k", "matched")),
    Mutant("watch restarts a failing sweep forever", "launch/tpu.py",
           "if retries == a.max_retries:", "if False:",
           ("tests/test_launch.py", "-k", "watch_retries"), ("tests/test_launch.py", "-k", "watch")),
]


def tree_files(root: str) -> list[str]:
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                       capture_output=True, check=True).stdout.decode()
  return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]


def copy_tree(dest: str, tests_rev: str | None):
  for f in tree_files(ROOT):
    os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
  if tests_rev:  # the tests as they were at REV, against today's code
    shutil.rmtree(os.path.join(dest, "tests"))
    archive = subprocess.run(["git", "archive", tests_rev, "tests"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def run_tests(dest: str, selection: tuple[str, ...], timeout: float) -> tuple[int | None, float, str]:
  env = dict(os.environ, PYTHONPATH=dest)
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not slow",
         *selection]
  start = time.monotonic()
  try:
    r = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, time.monotonic() - start, ""
  lines = (r.stdout + r.stderr).strip().splitlines()
  return r.returncode, time.monotonic() - start, lines[-1] if lines else ""


def apply(dest: str, m: Mutant) -> str | None:
  """Patches the copy; returns the original text, or None (with the reason printed) when the anchor is not there
  exactly once."""
  path = os.path.join(dest, m.path)
  text = open(path).read() if os.path.exists(path) else ""
  counts = [text.count(old) for old, _ in m.patches()]
  for (old, new), n in zip(m.patches(), counts):
    if n == 1:
      with open(path, "w") as f:
        f.write(text.replace(old, new))
      return text
  return "" if any(counts) else None


def verdict(code: int | None) -> str:
  return {None: "timeout", 0: "MISSED", 1: "caught", 5: "no tests selected"}.get(code, f"error (pytest exit {code})")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated substrings of mutant names")
  p.add_argument("--before", default=None, metavar="REV", help="use the tests of REV and each mutant's `before`")
  p.add_argument("--clean", action="store_true", help="first run each selection on the unmutated copy")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests")
  p.add_argument("--anchors", action="store_true", help="only check that every patch still applies")
  a = p.parse_args(argv)
  chosen = [m for m in MUTANTS if not a.only or any(s in m.name for s in a.only.split(","))]
  if a.anchors:
    bad = [m for m in chosen if not any(open(os.path.join(ROOT, m.path)).read().count(o) == 1 for o, _ in m.patches())]
    for m in bad:
      print(f"{m.name}: anchor not found exactly once in {m.path}: {m.old!r}")
    print(f"{len(chosen) - len(bad)} of {len(chosen)} patches apply")
    return 1 if bad else 0
  caught = missed = other = 0
  with tempfile.TemporaryDirectory(prefix="jaxreplay-mutants-") as dest:
    copy_tree(dest, a.before)
    sel = lambda m: m.before if a.before else m.tests
    unclean = set()  # selections that do not pass unmutated: a failure there says nothing about a mutant
    if a.clean:
      for s in dict.fromkeys(sel(m) for m in chosen):
        code, secs, last = run_tests(dest, s, a.timeout)
        if code != 0:
          unclean.add(s)
        print(f"clean  {' '.join(s)}: {'passes' if code == 0 else 'FAILS: ' + last} ({secs:.0f} s)", flush=True)
    for m in chosen:
      if sel(m) in unclean:
        print(f"{m.name:<58} n/a: its tests fail unmutated", flush=True)
        other += 1
        continue
      original = apply(dest, m)
      if not original:
        print(f"{m.name:<58} anchor {'not found' if original is None else 'ambiguous'} in {m.path}", flush=True)
        other += 1
        continue
      try:
        code, secs, last = run_tests(dest, sel(m), a.timeout)
      finally:
        with open(os.path.join(dest, m.path), "w") as f:
          f.write(original)
      v = verdict(code)
      caught += v == "caught"
      missed += v == "MISSED"
      other += v not in ("caught", "MISSED")
      print(f"{m.name:<58} {v:<10} {secs:5.0f} s  {' '.join(sel(m))}" + ("" if v in ("caught", "MISSED")
                                                                          else f"  [{last}]"), flush=True)
  print(f"caught {caught} of {len(chosen)} mutants" + (f" with the tests of {a.before}" if a.before else "")
        + f"; missed {missed}; not run or errors {other}")
  return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
  sys.exit(main())
