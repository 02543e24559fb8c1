"""Resumable training state, over orbax.

`Checkpointer` keeps the full state of a run under WORKDIR/checkpoints/STEP: the pytree `state` (parameters,
optimizer state, step; the step is also the data position, since data order is a pure function of it), a
JSON `extra` (replay position, metric bookkeeping, elapsed time) and a JSON `integrity` record (checksums of
every array, taken on device before the save). Saves are asynchronous and atomic: orbax writes a temporary
directory and renames it once every host has finished, so a step directory never looks complete early.
`restore_latest` still checks the newest one against its checksums; a damaged one is reported in one sentence
and moved to WORKDIR/checkpoints.damaged (never deleted), and the previous one is used.

WORKDIR may be a URL (gs://...): orbax then writes the arrays through tensorstore's kvstore straight to the
bucket, and its small files through etils.epath (gcsfs); a step directory is complete once orbax has written
its commit marker, which on an object store replaces the rename.

Exported weights (WORKDIR/export) are models/export.py's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxreplay import io, rundir
from jaxreplay.errors import CheckpointError, StorageError
from jaxreplay.models.export import (INTEGRITY_VERSION, abstract_like, agree, barrier, flat_tree,
                                     integrity_record, no_unraisable, one_line, quiet_orbax_logs)

TIME_SYNC_STEPS = 10  # multi-host: how often the time-based save decision is agreed on


# ---------------------------------------------------------------- multi-host helpers

def _all(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _integrity_problem(state, record) -> str | None:
  if not record or record.get("version") != INTEGRITY_VERSION:
    return None  # written before checksums existed: nothing to compare
  now = integrity_record(state)["arrays"]
  bad = [k for k, v in record["arrays"].items() if now.get(k) != v]
  if bad:
    return f"the data of {bad[0]}{' and others' if len(bad) > 1 else ''} does not match its checksum"
  return None


# ---------------------------------------------------------------- resumable state

def check_writable(workdir: str) -> str:
  """Fails early, with one sentence, if WORKDIR/checkpoints cannot be written; returns its path."""
  directory = rundir.checkpoints_dir(workdir)
  if io.is_url(workdir):
    try:
      return io.check_writable(directory)
    except StorageError as e:
      raise CheckpointError(str(e)) from None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"Cannot write checkpoints to {directory} ({e.strerror or e}): make it writable (chmod -R u+w "
        f"{os.path.abspath(workdir)}) or choose another --workdir; nothing already there was changed.") from None
  return directory


class Checkpointer:
  """Saves every `every_steps` steps or `every_minutes` minutes (asynchronously), keeps the last
  `keep_last` plus every `keep_every_steps`-th, and restores the newest intact checkpoint."""

  def __init__(self, workdir: str, ckpt_cfg):
    quiet_orbax_logs()
    self.directory = check_writable(workdir)
    self.damaged_dir = self.directory + ".damaged"
    self.cfg = ckpt_cfg
    self._last_save_time = time.monotonic()
    # Called before each save: e.g. the metric writer's flush, so that metrics.jsonl on an object store (rewritten
    # at intervals) holds every row up to the checkpoint that a resumed run starts from.
    self.before_save = lambda: None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep_last,
        keep_period=ckpt_cfg.keep_every_steps or None,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        create=True,
        cleanup_tmp_directories=True,  # leftovers of saves cut short by a kill
    )
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=dict(
          state=ocp.StandardCheckpointHandler(), extra=ocp.JsonCheckpointHandler(),
          integrity=ocp.JsonCheckpointHandler()))
    except OSError as e:
      raise CheckpointError(f"Cannot open the checkpoints in {self.directory} ({one_line(e)}): fix the "
                            "directory's permissions or choose another --workdir.") from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # -- restore

  def restore_latest(self, like_state):
    """(state, extra) of the newest intact checkpoint, placed like `like_state`; None when there is none.

    Raises CheckpointError if the checkpoints belong to a different model, or if none can be read."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      problem, restored = self._try_restore(step, like_state)
      if _all(problem is None):
        if damaged:
          self._set_aside(damaged, step)
        return restored["state"], restored.get("extra") or {}
      damaged.append((step, problem or "another host could not read it"))
    if damaged:
      listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
      raise CheckpointError(f"No checkpoint in {self.directory} can be read ({listing}): restore the directory "
                            "from a copy, or move it away to start this run from scratch.")
    return None

  def _try_restore(self, step: int, like_state):
    """(None, restored) or (problem, None); a checkpoint of a different model raises at once."""
    with no_unraisable():
      try:
        meta = self.manager.item_metadata(step)
        items = [k for k in ("state", "extra", "integrity") if k in meta.keys()]
        if "state" not in items or meta["state"] is None:
          return "its state is missing", None
        self._check_fits(meta["state"], like_state)
        args = dict(state=ocp.args.StandardRestore(abstract_like(like_state)))
        args.update({k: ocp.args.JsonRestore() for k in items if k != "state"})
        restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)).items())
      except CheckpointError:
        raise
      except Exception as e:  # unreadable: truncated files, bad JSON, missing arrays, ...
        return one_line(e), None
    problem = _integrity_problem(restored["state"], restored.get("integrity"))
    return (problem, None) if problem else (None, restored)

  def _check_fits(self, meta_state, like_state):
    saved = {k: m for k, m in flat_tree(meta_state).items() if m is not None}
    want = flat_tree(like_state)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    shape = lambda k: tuple(getattr(saved[k], "shape", ()) or ())
    reshaped = [k for k, x in want.items() if k in saved and shape(k) != tuple(x.shape)]
    if missing:
      where = f"it has no {missing[0]}"
    elif extra:
      where = f"it has {extra[0]}, which this run does not"
    elif reshaped:
      where = f"{reshaped[0]} has shape {shape(reshaped[0])} there, {tuple(want[reshaped[0]].shape)} here"
    else:
      return
    if any(k.endswith("blocks.qkv") for k in saved):  # format 1, written before the decoders became one
      raise CheckpointError(f"The checkpoints in {self.directory} hold the paper model's parameters in the format "
                            "of jaxreplay before its decoders became one: finish the run with that version (its "
                            "export then loads in this one), or start it again in a new --workdir.")
    raise CheckpointError(f"The checkpoints in {self.directory} were written by a run with a different model "
                          f"or optimizer ({where}): resume with the config that wrote them, or use a new "
                          "--workdir; nothing was changed.")

  def _set_aside(self, damaged, good_step: int):
    if jax.process_index() == 0:
      io.makedirs(self.damaged_dir)
      for step, _ in damaged:
        src = io.join(self.directory, str(step))
        dst = io.join(self.damaged_dir, f"{step}-{int(time.time())}")
        if io.exists(src):
          io.move(src, dst)
      newest, problem = damaged[0]
      print(f"jaxreplay: warning: the checkpoint at step {newest} in {self.directory} is damaged ({problem}), "
            f"so this run resumes from step {good_step} and the damaged one was moved to {self.damaged_dir}.",
            file=sys.stderr, flush=True)
    barrier("jaxreplay_checkpoint_set_aside")
    self.manager.reload()

  # -- save

  def should_save(self, step: int) -> bool:
    if self.cfg.every_steps and step % self.cfg.every_steps == 0:
      return True
    if not self.cfg.every_minutes:
      return False
    due = time.monotonic() - self._last_save_time >= 60.0 * self.cfg.every_minutes
    if jax.process_count() == 1:
      return due
    return step % TIME_SYNC_STEPS == 0 and agree(due)  # hosts' clocks differ: agree on host 0's, every few steps

  def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
    """Starts an asynchronous save if one is due (or `force`); returns whether it did."""
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      return False
    self.before_save()
    try:
      record = integrity_record(state)
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra),
          integrity=ocp.args.JsonSave(record)), force=True)
    except Exception as e:
      raise self._save_error(e) from None
    self._last_save_time = time.monotonic()
    return True

  def _save_error(self, e) -> CheckpointError:
    fix = ("check the bucket's permissions and quota (and the credentials found)" if io.is_url(self.directory)
           else "free disk space or fix the directory's permissions")
    return CheckpointError(f"Saving a checkpoint in {self.directory} failed ({one_line(e)}): {fix}, then rerun the "
                           "same command to resume from the last checkpoint, which is kept.")

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from None

  def close(self):
    self.wait()
    self.manager.close()
