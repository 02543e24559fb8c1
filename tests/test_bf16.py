"""bf16 compute (the GPU's and TPU's choice) on CPU, against fp32 compute on the same fp32 parameters.

Tolerances, for a 2-layer D=32 model: each of 12 training steps' loss within 1% of fp32's (relative; measured
≤ 0.35%); greedy samples of a trained model equal to fp32's for the first K=8 new tokens; the
KL and next-token losses of bf16 logits finite and ≥ 0 (KL ≥ −1e-6: fp32 rounding of a sum near zero).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreplay import config as config_lib
from jaxreplay.models import decoder as M
from jaxreplay.models import losses
from jaxreplay.models import sampler as S
from jaxreplay.train import loop, steps

from helpers import dot_operand_dtypes, tiny_config, token_dir

T, V, B, STEPS, K = 16, 48, 8, 12, 8


def cfg_in(dtype: str) -> M.ModelConfig:
  m = config_lib.default().model
  m.update(d_model=32, n_layers=2, head_dim=8, seq_len=T, vocab_size=V)
  return M.ModelConfig.from_config(m, dtype, "cpu")


def rows(seed: int):
  """Rows counting up by 3 modulo V from a random start: learnt in a few dozen steps."""
  start = np.random.default_rng(seed).integers(0, V, (B, 1))
  return ((start + 3 * np.arange(T)[None]) % V).astype(np.int32)


def train(cfg, n_steps: int):
  """(params, the losses of each step): Adam at 1e-2 from the same fp32 initialisation for any compute dtype."""
  opt = optax.adam(1e-2)
  state = steps.init_state(cfg, opt, jax.random.key(0))
  step = jax.jit(steps.make_train_step(steps.make_objective(cfg, None), opt, lambda s: 1e-2))
  out = []
  for i in range(n_steps):
    state, aux = step(state, None, rows(i % 4), None)
    out.append(float(aux["train_loss"]))
  return state["params"], np.asarray(out)


@pytest.fixture(scope="module")
def trained():
  return {dtype: train(cfg_in(dtype), STEPS) for dtype in ("float32", "bfloat16")}


def test_bf16_training_tracks_fp32_losses(trained):
  (p32, l32), (p16, l16) = trained["float32"], trained["bfloat16"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))  # parameters stay fp32
  np.testing.assert_allclose(l16, l32, rtol=1e-2)
  assert l32[-1] < 0.8 * l32[0] and l16[-1] < 0.8 * l16[0]  # both learnt, not just started alike


def test_bf16_sampler_gives_the_fp32_greedy_tokens(trained):
  params = trained["float32"][0]
  prompt = rows(7)[:, :3]
  got = {}
  for dtype in ("float32", "bfloat16"):
    fn = S.make_sampler(cfg_in(dtype), S.SamplingConfig(temperature=0.0), B, 3, 3 + K, return_logits=True)
    got[dtype] = np.asarray(fn(params, prompt, jax.random.key(0))[0])
    S.clear_compiled()
  np.testing.assert_array_equal(got["bfloat16"][:, 3:3 + K], got["float32"][:, 3:3 + K])
  assert (got["float32"][:, 3:] == rows(7)[:, 3:3 + K]).mean() > 0.5  # the trained model continues the rows


def test_kl_and_next_token_losses_in_bf16_are_finite_and_nonnegative(trained):
  params = trained["float32"][0]
  toks = rows(9)
  z32 = M.logits(cfg_in("float32"), params, toks)
  z16 = M.logits(cfg_in("bfloat16"), params, toks)
  p16 = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), params)  # a student that differs from the teacher
  s16 = M.logits(cfg_in("bfloat16"), p16, toks)
  for teacher, student in ((z32, z16), (z16, z16), (z32, s16), (z16, s16)):
    kl = float(losses.kl_loss(teacher, student))
    assert np.isfinite(kl) and kl >= -1e-6
    assert np.isfinite(losses.kl_per_position(teacher, student)).all()
  assert float(losses.kl_loss(z32, s16)) > 1e-3
  for z in (z16, s16):
    ntp = float(losses.next_token_loss(z, toks))
    assert np.isfinite(ntp) and ntp >= 0
  g = jax.jit(jax.grad(lambda p: losses.kl_loss(z32, M.logits(cfg_in("bfloat16"), p, toks))
               + losses.next_token_loss(M.logits(cfg_in("bfloat16"), p, toks), toks)))(p16)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))


# --- bf16 that cannot be dropped silently -----------------------------------------------------------------------
def test_a_bf16_config_multiplies_in_bf16_and_fp32_in_fp32():
  """The lowered programs, as the compiler gets them: every product of the forward pass in the compute dtype;
  in the training step all but the fp32 logits' and attention scores' backward products."""
  toks = rows(0)
  for dtype in ("float32", "bfloat16"):
    cfg = cfg_in(dtype)
    params = M.init_params(cfg, jax.random.key(0))
    fwd = dot_operand_dtypes(lambda p, t: M.logits(cfg, p, t), params, toks)
    assert len(fwd) >= 7 and set(fwd) == {("bf16", "bf16") if dtype == "bfloat16" else ("f32", "f32")}, fwd
    opt = optax.adam(1e-2)
    step = steps.make_train_step(steps.make_objective(cfg, None), opt, lambda s: 1e-2)
    state = steps.init_state(cfg, opt, jax.random.key(0))
    dots = dot_operand_dtypes(lambda s, r: step(s, None, r, None), state, toks)
    n16 = sum(d == ("bf16", "bf16") for d in dots)
    assert (n16 >= 0.75 * len(dots) >= 12) if dtype == "bfloat16" else n16 == 0, dots


def test_bf16_logits_differ_from_fp32_by_bf16_rounding_not_fp32s():
  """bf16 compute moves the logits by far more than fp32 rounding does (remat, another fp32 program: < 1e-5),
  and by no more than bf16's 8-bit mantissa allows through 2 layers."""
  params = M.init_params(cfg_in("float32"), jax.random.key(1))
  toks = rows(3)
  z32 = np.asarray(M.logits(cfg_in("float32"), params, toks))
  z32b = np.asarray(jax.jit(lambda p, t: M.logits(dataclasses.replace(cfg_in("float32"), remat=True), p, t))(params,
                                                                                                            toks))
  z16 = np.asarray(M.logits(cfg_in("bfloat16"), params, toks))
  assert np.abs(z32b - z32).max() < 1e-5
  scale = np.abs(z32).max()
  assert 1e-3 * scale < np.abs(z16 - z32).max() < 0.03 * scale


def test_the_run_takes_its_compute_dtype_from_the_config(tmp_path):
  """The stage's model computes in what config.model.compute_dtype says, and in the platform's choice for auto."""
  data = token_dir(tmp_path / "a")
  for name, want in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32), ("auto", jnp.float32)):
    c = tiny_config(data)
    c.model.compute_dtype = name
    assert loop.Stage(config_lib.validate(c), str(tmp_path / name)).model_cfg.dtype == want
