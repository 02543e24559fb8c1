"""Resumable training state and exported weights, over orbax.

`Checkpointer` keeps the full state of a run under WORKDIR/checkpoints/STEP: the pytree `state` (parameters,
optimizer state, step; the step is also the data position, since data order is a pure function of it), a
JSON `extra` (replay position, metric bookkeeping, elapsed time) and a JSON `integrity` record (checksums of
every array, taken on device before the save). Saves are asynchronous and atomic: orbax writes a temporary
directory and renames it once every host has finished, so a step directory never looks complete early.
`restore_latest` still checks the newest one against its checksums; a damaged one is reported in one sentence
and moved to WORKDIR/checkpoints.damaged (never deleted), and the previous one is used.

`export` writes the final weights, the config and a tokenizer reference under WORKDIR/export; finetuning runs
load them with `init.from=WORKDIR` onto any mesh or device count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from jaxreplay.io import write_json
from jaxreplay.errors import CheckpointError
from jaxreplay.models import decoder

INTEGRITY_VERSION = 1
TIME_SYNC_STEPS = 10  # multi-host: how often the time-based save decision is agreed on


# ---------------------------------------------------------------- quiet orbax

class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO lines (dozens per save); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs():
  for name in ("absl", "orbax"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
      logger.addFilter(_QuietOrbax())


@contextlib.contextmanager
def _no_unraisable():
  """A failed read leaves orbax coroutines that print pages of TensorStore specs; our one sentence suffices."""
  old, sys.unraisablehook = sys.unraisablehook, lambda *_: None
  try:
    yield
  finally:
    sys.unraisablehook = old


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- multi-host helpers

def _all(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _host_value(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


# ---------------------------------------------------------------- integrity checksums

def _key_str(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path) -> str:
  return ".".join(_key_str(e) for e in path)


def _flat(tree) -> dict:
  return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _words(x):
  """The array's bits as uint32 words (no reshape, so sharded arrays are reduced where they lie)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing dim of 2
  return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _flat_index(shape):
  idx, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= shape[d]
  return idx


@jax.jit
def _checksums(leaves):
  """Two uint32 sums per array (plain and position-weighted); integer sums are exact in any order,
  so a checkpoint restored onto another mesh or device count gives the same numbers."""
  out = []
  for x in leaves:  # scalars: replicated on every host whatever the inputs' shardings
    w = _words(x)
    out.append((w.sum(dtype=jnp.uint32), (w * (2 * _flat_index(w.shape) + 1)).sum(dtype=jnp.uint32)))
  return out


def integrity_record(state) -> dict:
  flat = _flat(state)
  sums = _checksums(list(flat.values()))
  return dict(version=INTEGRITY_VERSION,
              arrays={k: [int(_host_value(a)), int(_host_value(b))] for k, (a, b) in zip(flat, sums)})


def _integrity_problem(state, record) -> str | None:
  if not record or record.get("version") != INTEGRITY_VERSION:
    return None  # written before checksums existed: nothing to compare
  now = integrity_record(state)["arrays"]
  bad = [k for k, v in record["arrays"].items() if now.get(k) != v]
  if bad:
    return f"the data of {bad[0]}{' and others' if len(bad) > 1 else ''} does not match its checksum"
  return None


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding: orbax restores straight onto that layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------- resumable state

def check_writable(workdir: str) -> str:
  """Fails early, with one sentence, if WORKDIR/checkpoints cannot be written; returns its path."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if "://" in workdir:
    return directory
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
      raise CheckpointError(f"Cannot open the checkpoints in {self.directory} ({_one_line(e)}): fix the "
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
    with _no_unraisable():
      try:
        meta = self.manager.item_metadata(step)
        items = [k for k in ("state", "extra", "integrity") if k in meta.keys()]
        if "state" not in items or meta["state"] is None:
          return "its state is missing", None
        self._check_fits(meta["state"], like_state)
        args = dict(state=ocp.args.StandardRestore(_abstract(like_state)))
        args.update({k: ocp.args.JsonRestore() for k in items if k != "state"})
        restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)).items())
      except CheckpointError:
        raise
      except Exception as e:  # unreadable: truncated files, bad JSON, missing arrays, ...
        return _one_line(e), None
    problem = _integrity_problem(restored["state"], restored.get("integrity"))
    return (problem, None) if problem else (None, restored)

  def _check_fits(self, meta_state, like_state):
    saved = {k: m for k, m in _flat(meta_state).items() if m is not None}
    want = _flat(like_state)
    where = None
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    if missing or extra:
      where = (f"it has no {missing[0]}" if missing else f"it has {extra[0]}, which this run does not")
    else:
      for k, x in want.items():
        shape = tuple(getattr(saved[k], "shape", ()) or ())
        if shape != tuple(x.shape):
          where = f"{k} has shape {shape} there, {tuple(x.shape)} here"
          break
    if where and any("blocks/qkv" in k for k in saved):  # format 1, written before the decoders became one
      raise CheckpointError(f"The checkpoints in {self.directory} hold the paper model's parameters in the format "
                            "of jaxreplay before its decoders became one: finish the run with that version (its "
                            "export then loads in this one), or start it again in a new --workdir.")
    if where:
      raise CheckpointError(f"The checkpoints in {self.directory} were written by a run with a different model "
                            f"or optimizer ({where}): resume with the config that wrote them, or use a new "
                            "--workdir; nothing was changed.")

  def _set_aside(self, damaged, good_step: int):
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir, exist_ok=True)
      for step, _ in damaged:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.damaged_dir, f"{step}-{int(time.time())}")
        if os.path.exists(src):
          os.replace(src, dst)
      newest, problem = damaged[0]
      print(f"jaxreplay: warning: the checkpoint at step {newest} in {self.directory} is damaged ({problem}), "
            f"so this run resumes from step {good_step} and the damaged one was moved to {self.damaged_dir}.",
            file=sys.stderr, flush=True)
    _barrier("jaxreplay_checkpoint_set_aside")
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
    if step % TIME_SYNC_STEPS:  # hosts' clocks differ: agree on host 0's, every few steps
      return False
    return bool(_host_value(multihost_utils.broadcast_one_to_all(np.int32(due))))

  def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
    """Starts an asynchronous save if one is due (or `force`); returns whether it did."""
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      return False
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
    return CheckpointError(f"Saving a checkpoint in {self.directory} failed ({_one_line(e)}): free disk space or "
                           "fix the directory's permissions, then rerun the same command to resume from the last "
                           "checkpoint, which is kept.")

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from None

  def close(self):
    self.wait()
    self.manager.close()


# ---------------------------------------------------------------- export

def _tokenizer_reference(workdir: str, config_dict: dict) -> dict:
  """Which tokenizer reads this model's ids: the hash recorded with its data, and where a copy lies."""
  path = (config_dict.get("data") or {}).get("path") or ""
  meta_path = os.path.join(path, "meta.json")
  ref = dict(data_path=path)
  if path and os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    ref.update(tokenizer_hash=meta.get("tokenizer_hash"), vocab_size=meta.get("vocab_size"))
  for tok in (os.path.join(workdir, "tokenizer.json"), os.path.join(path, "tokenizer.json")):
    if path and os.path.exists(tok):
      ref["tokenizer_path"] = os.path.abspath(tok)
      break
  return ref


def export(workdir: str, params, config_dict: dict, info: dict):
  """Writes WORKDIR/export/{params, config.json, info.json}; info.json is removed first and written last,
  so it exists only while a complete export does."""
  quiet_orbax_logs()
  directory = os.path.abspath(os.path.join(workdir, "export"))
  info_path = os.path.join(directory, "info.json")
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(info_path):
      os.remove(info_path)
  _barrier("jaxreplay_export_start")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), params, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if jax.process_index() == 0:
    info = dict(info, tokenizer=_tokenizer_reference(workdir, config_dict), params_format=decoder.PARAMS_FORMAT)
    for name, obj in (("config.json", config_dict), ("info.json", info)):
      write_json(os.path.join(directory, name), obj, sort_keys=True)
  _barrier("jaxreplay_export_done")


def exported_config(workdir: str) -> dict:
  if not workdir or not os.path.isdir(workdir):
    raise CheckpointError(f"init.from={workdir!r} does not exist: set config.init.from to the workdir of a "
                          "finished pretraining run.")
  directory = os.path.join(workdir, "export")
  if not os.path.exists(os.path.join(directory, "info.json")):
    raise CheckpointError(f"init.from={workdir!r} holds no finished export ({directory}/info.json is missing): "
                          "point it at the workdir of a pretraining run that has finished, or rerun that run "
                          "to finish it.")
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def exported_info(workdir: str) -> dict:
  exported_config(workdir)
  with open(os.path.join(workdir, "export", "info.json")) as f:
    return json.load(f)


def load_exported(workdir: str, like_params=None):
  """Restores exported weights onto the shardings of `like_params` (any mesh or device count); without
  `like_params`, onto this process's first device (for tools that only read them). An export of an earlier
  parameter format (info.json's params_format, 1 when absent) is converted by `decoder.upgrade_params`."""
  quiet_orbax_logs()
  old_format = exported_info(workdir).get("params_format", 1) < decoder.PARAMS_FORMAT
  params_dir = os.path.abspath(os.path.join(workdir, "export", "params"))
  ckptr = ocp.StandardCheckpointer()
  with _no_unraisable():
    try:
      meta = ckptr.metadata(params_dir)
      meta = getattr(meta, "item_metadata", meta)
      meta = meta.tree if hasattr(meta, "tree") else meta
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      on_host = lambda tree: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
      if old_format:  # restored whole on this host, converted, then placed
        saved = decoder.upgrade_params(jax.device_get(ckptr.restore(params_dir, on_host(meta))))
      else:
        saved = meta
      like_params = on_host(saved) if like_params is None else like_params
      _check_export_fits(params_dir, _flat(saved), _flat(like_params))
      if not old_format:
        return ckptr.restore(params_dir, _abstract(like_params))
      return jax.tree.map(lambda x, like: jax.make_array_from_callback(x.shape, like.sharding, lambda i: x[i]),
                          saved, like_params)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"The weights exported in {params_dir} cannot be read ({_one_line(e)}): rerun the "
                            "pretraining run in that workdir to export them again.") from None
    finally:
      ckptr.close()


def _check_export_fits(params_dir: str, saved: dict, want: dict):
  for k, x in want.items():
    m = saved.get(k)
    if m is None or tuple(m.shape) != tuple(x.shape):
      got = "nothing" if m is None else f"shape {tuple(m.shape)}"
      raise CheckpointError(f"The weights exported in {params_dir} do not fit this run's model ({k}: "
                            f"{got} there, shape {tuple(x.shape)} here): use the same model config as the "
                            "run that exported them.")
