"""The layout of a run's workdir and of a sweep's: every name in them is spelled here, and every other module asks
this one (paths in, paths out).

  RUN/    config.json (the resolved config, written first), metrics.jsonl, checkpoints/, export/ (the final
          weights, models/export.py), hf/ (export.hf), tokenizer.json, final.json (the result, written last: the
          run is finished when it exists)
  SWEEP/  sweep.json (the expanded sweep), results.sqlite (a row per finished run), locks/ (a flock per run),
          runs/NAME/ (each run's workdir), packs/ID/ (runs trained together), jax_cache/

A workdir may be a URL (gs://bucket/...): every path here is then a URL too (jaxreplay.io joins them).
"""

from __future__ import annotations

import hashlib
import os

from jaxreplay import io

CONFIG, METRICS, CHECKPOINTS, EXPORT, HF = "config.json", "metrics.jsonl", "checkpoints", "export", "hf"
TOKENIZER, FINAL, DATA_STATS = "tokenizer.json", "final.json", "data_stats.json"
PACK, WORKER_LOG, LM_EVAL = "pack.json", "worker.log", "lm_eval.json"
SWEEP, RESULTS, LOCKS, RUNS, PACKS, JAX_CACHE = "sweep.json", "results.sqlite", "locks", "runs", "packs", "jax_cache"


def config_file(workdir: str) -> str:
  return io.join(workdir, CONFIG)


def final_file(workdir: str) -> str:
  return io.join(workdir, FINAL)


def is_finished(workdir: str) -> bool:
  return io.exists(final_file(workdir))


def read_final(workdir: str) -> dict:
  return io.read_json(final_file(workdir))


def checkpoints_dir(workdir: str) -> str:
  return io.abspath(io.join(workdir, CHECKPOINTS))


def export_dir(workdir: str) -> str:
  return io.abspath(io.join(workdir, EXPORT))


def run_dir(root: str, name: str) -> str:
  """The workdir of the sweep's run NAME (e.g. pretrain/d=256)."""
  return io.join(io.abspath(root), RUNS, *name.split("/"))


def lock_file(root: str, name: str) -> str:
  safe = name.replace("/", "__")[:80]
  return io.join(root, LOCKS, f"{safe}.{hashlib.sha1(name.encode()).hexdigest()[:8]}.lock")


def host_dir(root: str) -> str:
  """Where this host keeps a sweep's local files (results.sqlite, worker logs, jax_cache): the sweep root on a
  disk; for a URL, a folder of this host's cache named by it (SQLite cannot lock, nor a log append, on an object
  store; the table is a cache of the final.json objects, rebuilt from them)."""
  if not io.is_url(root):
    return root
  return os.path.join(io.host_cache_dir(), "sweeps", hashlib.sha1(io.abspath(root).encode()).hexdigest()[:16])


def worker_log(root: str, name: str) -> str:
  """The log of the worker process that trains run NAME: in its workdir, or in host_dir on an object store."""
  if not io.is_url(root):
    return os.path.join(run_dir(root, name), WORKER_LOG)
  return os.path.join(host_dir(root), "logs", name.replace("/", "__") + ".log")


def lease_file(root: str, name: str) -> str:
  """The lease object a runner creates to claim run NAME of a sweep on an object store (no flock there)."""
  return lock_file(root, name)[:-len(".lock")] + ".lease.json"


def sweep_of(workdir: str) -> tuple[str, str] | None:
  """(sweep root, run name) when `workdir` is SWEEP/runs/NAME of a sweep, else None."""
  parts = io.abspath(workdir).split("/")  # a URL splits as 'gs:', '', 'bucket', ...
  for i in range(len(parts) - 1, 0, -1):
    if parts[i] == RUNS and i + 1 < len(parts):
      root = "/".join(parts[:i]) or os.sep
      if io.exists(io.join(root, SWEEP)):
        return root, "/".join(parts[i + 1:])
  return None
