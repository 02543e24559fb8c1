"""Exported weights, over orbax: what a finished run leaves for the runs that start from it.

`export` writes the final weights, the config and a tokenizer reference under WORKDIR/export; finetuning runs,
the sampler's replay source and lm-eval load them with `load_exported` onto any mesh or device count. The orbax
helpers here (quiet logs, one-line errors, path-keyed trees, barriers, checksums) serve train/checkpoint.py too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from jaxreplay import io, rundir
from jaxreplay.io import write_json
from jaxreplay.errors import CheckpointError
from jaxreplay.models import decoder


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
def no_unraisable():
  """A failed read leaves orbax coroutines that print pages of TensorStore specs; our one sentence suffices."""
  old, sys.unraisablehook = sys.unraisablehook, lambda *_: None
  try:
    yield
  finally:
    sys.unraisablehook = old


def one_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 1] + "…"


def barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's answer on every process, so that all of them run the same (collective) programs."""
  if jax.process_count() == 1:
    return flag
  return bool(host_value(multihost_utils.broadcast_one_to_all(np.int32(flag))))


def flat_tree(tree) -> dict:
  """{'params.blocks.q_proj': leaf, ...}: the leaves keyed by their dotted paths (the integrity record's keys)."""
  return {jax.tree_util.keystr(p, simple=True, separator="."): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_like(tree):
  """ShapeDtypeStructs carrying each leaf's sharding: orbax restores straight onto that layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------- checksums (checkpoint integrity, cache keys)

INTEGRITY_VERSION = 1


def host_value(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


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
  """{version, arrays: {path: [sum, weighted sum]}}: the same on any mesh or device count."""
  flat = flat_tree(state)
  sums = _checksums(list(flat.values()))
  return dict(version=INTEGRITY_VERSION,
              arrays={k: [int(host_value(a)), int(host_value(b))] for k, (a, b) in zip(flat, sums)})


def _tokenizer_reference(workdir: str, config_dict: dict) -> dict:
  """Which tokenizer reads this model's ids: the hash recorded with its data, and where a copy lies."""
  path = (config_dict.get("data") or {}).get("path") or ""
  meta_path = io.join(path, "meta.json") if path else ""
  ref = dict(data_path=path)
  if path and io.exists(meta_path):
    meta = io.read_json(meta_path)
    ref.update(tokenizer_hash=meta.get("tokenizer_hash"), vocab_size=meta.get("vocab_size"))
  for tok in (io.join(workdir, "tokenizer.json"), io.join(path or ".", "tokenizer.json")):
    if path and io.exists(tok):
      ref["tokenizer_path"] = io.abspath(tok)
      break
  return ref


def export(workdir: str, params, config_dict: dict, info: dict):
  """Writes WORKDIR/export/{params, config.json, info.json}; info.json is removed first and written last,
  so it exists only while a complete export does."""
  quiet_orbax_logs()
  directory = rundir.export_dir(workdir)
  info_path = io.join(directory, "info.json")  # a URL too when the workdir is: orbax writes through tensorstore
  if jax.process_index() == 0:
    io.makedirs(directory)
    io.remove(info_path)
  barrier("jaxreplay_export_start")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(io.join(directory, "params"), params, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if jax.process_index() == 0:
    info = dict(info, tokenizer=_tokenizer_reference(workdir, config_dict), params_format=decoder.PARAMS_FORMAT)
    for name, obj in (("config.json", config_dict), ("info.json", info)):
      write_json(io.join(directory, name), obj, sort_keys=True)
  barrier("jaxreplay_export_done")


def exported_config(workdir: str) -> dict:
  if not workdir or not io.isdir(workdir):
    raise CheckpointError(f"init.from={workdir!r} does not exist: set config.init.from to the workdir of a "
                          "finished pretraining run.")
  directory = rundir.export_dir(workdir)
  if not io.exists(io.join(directory, "info.json")):
    raise CheckpointError(f"init.from={workdir!r} holds no finished export ({directory}/info.json is missing): "
                          "point it at the workdir of a pretraining run that has finished, or rerun that run "
                          "to finish it.")
  return io.read_json(io.join(directory, "config.json"))


def exported_info(workdir: str) -> dict:
  exported_config(workdir)
  return io.read_json(io.join(rundir.export_dir(workdir), "info.json"))


def load_exported(workdir: str, like_params=None):
  """Restores exported weights onto the shardings of `like_params` (any mesh or device count); without
  `like_params`, onto this process's first device (for tools that only read them). An export of an earlier
  parameter format (info.json's params_format, 1 when absent) is converted by `decoder.upgrade_params`."""
  quiet_orbax_logs()
  old_format = exported_info(workdir).get("params_format", 1) < decoder.PARAMS_FORMAT
  params_dir = io.join(rundir.export_dir(workdir), "params")
  ckptr = ocp.StandardCheckpointer()
  with no_unraisable():
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
      _check_export_fits(params_dir, flat_tree(saved), flat_tree(like_params))
      if not old_format:
        return ckptr.restore(params_dir, abstract_like(like_params))
      return jax.tree.map(lambda x, like: jax.make_array_from_callback(x.shape, like.sharding, lambda i: x[i]),
                          saved, like_params)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"The weights exported in {params_dir} cannot be read ({one_line(e)}): rerun the "
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
