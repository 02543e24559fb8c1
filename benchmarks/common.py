"""What the train-step benchmarks share: the model sizes, and a model + optimizer + sharded state on the mesh.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this directory on sys.path).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import tempfile
from typing import Any, Callable

import jax
import numpy as np

from jaxreplay import config as config_lib
from jaxreplay.models import decoder
from jaxreplay import sharding
from jaxreplay.train import optim
from jaxreplay.train import steps

SIZES = {
    "small": dict(d_model=128, n_layers=4, head_dim=32, seq_len=128, batch=32),  # the quickstart model
    "medium": dict(d_model=256, n_layers=6, head_dim=64, seq_len=256, batch=16),
    "paper6m": dict(d_model=256, n_layers=6, head_dim=64, seq_len=256, batch=256),  # 5.77M paper params
    "paper_d512": dict(d_model=512, n_layers=8, head_dim=64, seq_len=256, batch=256),
    "paper205m": dict(d_model=1024, n_layers=16, head_dim=64, seq_len=256, batch=256),  # 205M paper params
    "tiny": dict(d_model=32, n_layers=1, head_dim=16, seq_len=16, batch=4),  # the smoke test's
}
TOTAL_STEPS = 10_000  # the schedule's length; only the LR's shape depends on it


@dataclasses.dataclass
class Setup:
  size: dict
  config: Any  # the ml_collections config
  model: decoder.ModelConfig
  mesh: Any
  optimizer: Any
  state_shardings: Any
  init: Callable  # key -> a fresh state (params, opt_state, step)

  def state(self, seed: int = 0):
    return jax.jit(self.init, out_shardings=self.state_shardings)(jax.random.key(seed))

  def batches(self, n: int, seed: int = 0) -> list:
    """n random token batches [B, T] on the mesh."""
    rng = np.random.default_rng(seed)
    shape = (self.size["batch"], self.size["seq_len"])
    return [sharding.put_batch(rng.integers(0, self.model.vocab_size, shape, dtype=np.int32), self.mesh)
            for _ in range(n)]

  def train_step(self, replay_cfg=None, teacher: bool = False, steps_module=steps):
    """The jitted train step of `steps_module` (plain when replay_cfg is None), donating its state."""
    batch_sh = sharding.batch_sharding(self.mesh)
    frozen_sh = self.state_shardings["params"] if replay_cfg is not None else None
    replay_sh = batch_sh if replay_cfg is not None else None
    in_sh = (self.state_shardings, frozen_sh, batch_sh, replay_sh)
    if teacher:  # teacher logits [B, T, V] passed in, as kept from sampling
      in_sh += (sharding.batch_sharding(self.mesh, 3),)
    step = steps_module.make_train_step(steps_module.make_objective(self.model, replay_cfg), self.optimizer,
                                 optim.lr_schedule(self.config, TOTAL_STEPS))
    return jax.jit(step, in_shardings=in_sh, out_shardings=(self.state_shardings, None), donate_argnums=(0,))


def setup(size: str, dtype: str = "auto") -> Setup:
  s = SIZES[size]
  c = config_lib.default()
  c.model.update(d_model=s["d_model"], n_layers=s["n_layers"], head_dim=s["head_dim"], seq_len=s["seq_len"])
  c.optim.batch_size = s["batch"]
  c.stop.steps = TOTAL_STEPS
  platform = jax.default_backend()
  cfg = decoder.ModelConfig.from_config(
      c.model, config_lib.compute_dtype_name(c, platform) if dtype == "auto" else dtype, platform)
  mesh = sharding.make_mesh(c.mesh)
  opt = optim.make_optimizer(c, TOTAL_STEPS)
  init = lambda k: steps.init_state(cfg, opt, k)
  sh = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  return Setup(s, c, cfg, mesh, opt, sh, init)


def steps_at(rev: str):
  """jaxreplay/train/steps.py as of git revision `rev`, with that revision's models/losses.py, as a module
  beside today's: a benchmark times the two interleaved in one process (the rest of the package is today's)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tmp = tempfile.mkdtemp(prefix="jaxreplay_steps_")
  mods = {}
  for name, rel in (("losses", "jaxreplay/models/losses.py"), ("steps", "jaxreplay/train/steps.py")):
    path = os.path.join(tmp, f"{name}_{rev}.py".replace("~", "_").replace("^", "_"))
    with open(path, "w") as f:
      f.write(subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, check=True, capture_output=True,
                             text=True).stdout)
    spec = importlib.util.spec_from_file_location(f"{name}_at_rev", path)
    mods[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mods[name])
  mods["steps"].losses = mods["losses"]  # its functions look the module up when called
  return mods["steps"]
