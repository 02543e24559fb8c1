"""`jaxreplay eval`: lm-evaluation-harness tasks on a finished run; results in the run and its sweep.

  jaxreplay eval --workdir=RUN --tasks=arc_easy,hellaswag [--limit=N] [--include_path=DIR] [--batch_size=16]

RUN is a paper-model run (its export/), an instruct run (its hf/) or a Hugging Face model directory. The
harness's results go to RUN/lm_eval.json; when RUN is a run of a sweep (SWEEP/runs/NAME), each score is also a
row (name, task, metric, value) of the lm_eval table in SWEEP/results.sqlite (for a gs:// RUN, in this host's
cache of that table; lm_eval.json goes to the bucket). Needs the `eval` extra.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import time

from jaxreplay import io, rundir
from jaxreplay.errors import LMEvalError, UsageError
from jaxreplay.experiments import sweepdir
from jaxreplay.io import write_json
from jaxreplay.rundir import sweep_of

RESULTS_FILE = rundir.LM_EVAL
TABLE = ("CREATE TABLE IF NOT EXISTS lm_eval (name TEXT, task TEXT, metric TEXT, value REAL, evaluated REAL, "
         "PRIMARY KEY (name, task, metric))")


def record_in_sweep(root: str, name: str, scores: dict) -> int:
  db = sweepdir.connect(root)
  db.execute(TABLE)
  now = time.time()
  rows = [(name, task, metric, value, now) for task, row in scores.items() for metric, value in row.items()]
  db.executemany("INSERT OR REPLACE INTO lm_eval VALUES (?,?,?,?,?)", rows)
  db.close()
  return len(rows)


def local_model(workdir: str) -> str:
  """The run itself on a disk; a run on an object store with its model files (export/, hf/, tokenizer.json,
  config.json) downloaded once into this host's cache, whole (a tmp folder renamed), where the harness reads them."""
  if not io.is_url(workdir):
    return workdir
  local = os.path.join(io.host_cache_dir(), "eval", hashlib.sha1(io.abspath(workdir).encode()).hexdigest()[:16])
  if os.path.isdir(local):
    return local
  tmp = io.tmp_name(local)
  os.makedirs(tmp)
  try:
    for name in (rundir.EXPORT, rundir.HF, rundir.TOKENIZER, rundir.CONFIG):
      if io.exists(io.join(workdir, name)):
        fs, inner = io.fs_and_path(io.join(workdir, name))
        fs.get(inner, os.path.join(tmp, name), recursive=True)
    os.replace(tmp, local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog=argv[0] if argv else "jaxreplay eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--tasks", required=True, help="comma-separated harness task names")
  p.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
  p.add_argument("--include_path", default=None, help="a directory of your own task YAML files")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--num_fewshot", type=int, default=None)
  p.add_argument("--max_length", type=int, default=None)
  p.add_argument("--encode_separately", action="store_true",
                 help="tokenize context and continuation on their own (chat-formatted tasks)")
  a = p.parse_args(argv[1:])
  if importlib.util.find_spec("lm_eval") is None:
    raise UsageError("`jaxreplay eval` needs lm-evaluation-harness: pip install 'jaxreplay[eval]'.")
  from jaxreplay.evals import lm_eval as adapter  # lazy: lm-eval is the optional `eval` extra
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
  if not tasks:
    raise LMEvalError("--tasks names no task: give comma-separated harness task names.")
  lm = adapter.JaxReplayLM(local_model(a.workdir), batch_size=a.batch_size, max_length=a.max_length,
                           encode_separately=a.encode_separately)
  results = adapter.run_tasks(lm, tasks, limit, a.include_path, a.num_fewshot)
  scores = adapter.flat_scores(results)
  out = dict(tasks=tasks, limit=limit, scores=scores, results=results["results"],
             versions=results.get("versions", {}), n_samples=results.get("n-samples", {}))
  path = io.join(a.workdir, RESULTS_FILE)
  write_json(path, out, default=str)
  for task, row in scores.items():
    print(f"{task}: " + ", ".join(f"{m}={v:.4f}" for m, v in row.items() if not m.endswith("_stderr")))
  print(f"results: {path}")
  sweep = sweep_of(a.workdir)
  if sweep:
    n = record_in_sweep(*sweep, scores)
    print(f"sweep table: {n} scores of {sweep[1]} in {sweepdir.results_file(sweep[0])} (table lm_eval)")
  return 0
