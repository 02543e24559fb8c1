"""The TPU's platform choices made from compiled numbers (jaxreplay/platform.py, `jaxreplay compile`) compute what
the general path does, on CPU: remat with scanned layers gives the unrolled, stored-activation step's loss,
gradients and updated state, to fp32 rounding.
"""

import dataclasses

import jax
import numpy as np

from jaxreplay import config as config_lib, platform as platform_lib
from jaxreplay.models import decoder
from jaxreplay.train import optim, steps


def model_cfgs():
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=3, head_dim=8, seq_len=12, vocab_size=50)
  c.optim.batch_size, c.stop.steps = 4, 10
  tpu = decoder.ModelConfig.from_config(c.model, "float32", "tpu")  # the TPU's choices, in fp32
  cpu = decoder.ModelConfig.from_config(c.model, "float32", "cpu")
  return c, tpu, cpu


def test_tpu_chooses_remat_and_scan():
  tpu = platform_lib.choices("tpu")
  assert tpu.remat and not tpu.unroll_layers
  assert not platform_lib.choices("cpu").remat and not platform_lib.choices("gpu").remat
  _, tpu_cfg, cpu_cfg = model_cfgs()
  assert (tpu_cfg.remat, tpu_cfg.scan_unroll) == (True, 1) and (cpu_cfg.remat, cpu_cfg.scan_unroll) == (False, 3)


def test_remat_scanned_train_step_equals_the_general_one():
  c, tpu_cfg, cpu_cfg = model_cfgs()
  tpu_cfg = dataclasses.replace(tpu_cfg, attention=cpu_cfg.attention)  # the kernel choice is tested apart
  opt = optim.make_optimizer(c, 10)
  state = steps.init_state(cpu_cfg, opt, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 50)
  out = {}
  for name, cfg in (("tpu", tpu_cfg), ("cpu", cpu_cfg)):
    step = steps.make_train_step(steps.make_objective(cfg, None), opt, optim.lr_schedule(c, 10))
    out[name] = jax.jit(step)(state, None, tokens, None)
  (tpu_state, tpu_aux), (cpu_state, cpu_aux) = out["tpu"], out["cpu"]
  np.testing.assert_allclose(tpu_aux["train_loss"], cpu_aux["train_loss"], rtol=1e-6)
  np.testing.assert_allclose(tpu_aux["grad_norm"], cpu_aux["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), tpu_state, cpu_state)
