"""Resumable training state and exported weights, over orbax.

`Checkpointer` keeps the full state of a run (parameters, optimizer state, step, and a JSON `extra` with the
data position, replay position and metric bookkeeping) under WORKDIR/checkpoints; `export` writes the final
weights with the config under WORKDIR/export, which finetuning runs load by `init.from=WORKDIR`, on any mesh.
"""

from __future__ import annotations

import json
import os
import time

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint or export cannot be used; the message says why and what to do."""


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding: orbax restores straight onto that layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Saves every `every_steps` steps or `every_minutes` minutes, keeps the last K (plus every M-th)."""

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.cfg = ckpt_cfg
    self._last_save_time = time.monotonic()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep_last,
        keep_period=ckpt_cfg.keep_every_steps or None,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like_state):
    """Returns (state, extra) of the newest checkpoint, or None when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like_state)), extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]

  def should_save(self, step: int) -> bool:
    minutes = (time.monotonic() - self._last_save_time) / 60.0
    by_steps = self.cfg.every_steps and step % self.cfg.every_steps == 0
    by_time = self.cfg.every_minutes and minutes >= self.cfg.every_minutes
    return bool(by_steps or by_time)

  def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    self._last_save_time = time.monotonic()
    return True

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def export(workdir: str, params, config_dict: dict, info: dict):
  """Writes WORKDIR/export/{params, config.json, info.json}; info.json is written last and marks completion."""
  directory = os.path.abspath(os.path.join(workdir, "export"))
  ckptr = ocp.StandardCheckpointer()
  params_dir = os.path.join(directory, "params")
  if os.path.exists(params_dir):
    import shutil
    shutil.rmtree(params_dir)
  ckptr.save(params_dir, params)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)
    tmp = os.path.join(directory, "info.json.tmp")
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, "info.json"))


def exported_config(workdir: str) -> dict:
  directory = os.path.join(workdir, "export")
  if not os.path.exists(os.path.join(directory, "info.json")):
    raise CheckpointError(f"init.from={workdir!r} holds no finished export ({directory}/info.json is missing): "
                          "point it at the workdir of a pretraining run that has finished.")
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def load_exported(workdir: str, like_params):
  """Restores exported weights onto the shardings of `like_params` (any mesh or device count)."""
  exported_config(workdir)
  params_dir = os.path.abspath(os.path.join(workdir, "export", "params"))
  try:
    return ocp.StandardCheckpointer().restore(params_dir, _abstract(like_params))
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"The weights exported in {params_dir} do not fit this run's model ({e}): "
                          "use the same model config as the run that exported them.") from e
