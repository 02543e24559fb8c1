"""The layout of a run's workdir and of a sweep's workdir: every name in them is spelled here, and every other
module asks this one (paths in, paths out).

  RUN/config.json       the resolved config, written before the first step
  RUN/metrics.jsonl     one row per logged or evaluated step
  RUN/checkpoints/      the train state (orbax)
  RUN/export/           the final weights and the config they need (models/export.py)
  RUN/hf/               a Hugging Face checkpoint of a model.path run (export.hf)
  RUN/tokenizer.json    the tokenizer that reads the run's samples
  RUN/final.json        the result, written last: the run is finished when it exists

  SWEEP/sweep.json      the expanded sweep and its fingerprint
  SWEEP/results.sqlite  one row per finished run
  SWEEP/locks/*.lock    one per run, held (flock) by the process that trains it
  SWEEP/runs/NAME/      each run's workdir (NAME is e.g. pretrain/d=256)
  SWEEP/packs/ID/       the checkpoints of runs trained together (experiments/pack_runner.py)
"""

from __future__ import annotations

import hashlib
import json
import os

CONFIG, METRICS, CHECKPOINTS, EXPORT, HF = "config.json", "metrics.jsonl", "checkpoints", "export", "hf"
TOKENIZER, FINAL, DATA_STATS = "tokenizer.json", "final.json", "data_stats.json"
PACK, WORKER_LOG, LM_EVAL = "pack.json", "worker.log", "lm_eval.json"
SWEEP, RESULTS, LOCKS, RUNS, PACKS, JAX_CACHE = "sweep.json", "results.sqlite", "locks", "runs", "packs", "jax_cache"


def config_file(workdir: str) -> str:
  return os.path.join(workdir, CONFIG)


def metrics_file(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS))


def export_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, EXPORT))


def final_file(workdir: str) -> str:
  return os.path.join(workdir, FINAL)


def is_finished(workdir: str) -> bool:
  return os.path.exists(final_file(workdir))


def read_final(workdir: str) -> dict:
  with open(final_file(workdir)) as f:
    return json.load(f)


def sweep_file(root: str) -> str:
  return os.path.join(root, SWEEP)


def results_db(root: str) -> str:
  return os.path.join(root, RESULTS)


def locks_dir(root: str) -> str:
  return os.path.join(root, LOCKS)


def lock_file(root: str, name: str) -> str:
  safe = name.replace("/", "__")[:80]
  return os.path.join(locks_dir(root), f"{safe}.{hashlib.sha1(name.encode()).hexdigest()[:8]}.lock")


def run_dir(root: str, name: str) -> str:
  return os.path.join(os.path.abspath(root), RUNS, *name.split("/"))


def pack_dir(root: str, pack_id: str) -> str:
  return os.path.join(root, PACKS, pack_id)


def sweep_of(workdir: str) -> tuple[str, str] | None:
  """(sweep root, run name) when `workdir` is SWEEP/runs/NAME of a sweep, else None."""
  parts = os.path.abspath(workdir).split(os.sep)
  for i in range(len(parts) - 1, 0, -1):
    if parts[i] == RUNS and i + 1 < len(parts):
      root = os.sep.join(parts[:i]) or os.sep
      if os.path.exists(sweep_file(root)):
        return root, "/".join(parts[i + 1:])
  return None
