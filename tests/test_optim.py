"""Closed-form checks of batch-size-aware AdamW (../shared/paper/batchsize_digest.md §4) and the schedules."""

import decimal
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib
from jaxreplay.train import optim


def make_config(batch_size=1, seq_len=512, **optim_overrides):
  c = config_lib.default()
  c.model.seq_len = seq_len
  c.optim.batch_size = batch_size
  c.optim.warmup_tokens = 0
  c.optim.weight_decay = 0.0
  for k, v in optim_overrides.items():
    c.optim[k] = v
  return c


def adam_state(opt_state) -> optax.ScaleByAdamState:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def run_steps(tx, params, grads_K):
  """Applies tx to each gradient in grads_K (leading axis = steps) in one scan; returns updates and state."""
  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), u
  (params, state), updates_K = jax.lax.scan(step, (params, tx.init(params)), grads_K)
  return updates_K, state, params


def accurate_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """optim's accurate Adam with directly given decays."""
  omb1, omb2 = 1.0 - b1, 1.0 - b2
  hp = dict(b1=b1, omb1=omb1, b2=b2, omb2=omb2, log_b1=optim.log_decay(omb1), log_b2=optim.log_decay(omb2), eps=eps)
  return optim.scale_by_adam(("accurate", omb1 <= 0.5, omb2 <= 0.5), hp)


# --------------------------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("t_half,batch,k", [(1e7, 1, 4), (1e7, 64, 16), (3e5, 3, 7), (1e8, 1, 1000)])
def test_power_of_decay_equals_decay_at_k_times_batch(t_half, batch, k):
  n = batch * 512
  assert optim.halflife_to_decay(t_half, n) ** k == pytest.approx(optim.halflife_to_decay(t_half, k * n), rel=1e-12)
  assert optim.rescale_decay(optim.halflife_to_decay(t_half, n), n, k * n) == pytest.approx(
      optim.halflife_to_decay(t_half, k * n), rel=1e-12)
  beta = optim.halflife_to_decay(t_half, n)
  assert beta ** (t_half / n) == pytest.approx(0.5, rel=1e-9)  # β's 1e-16 error grows with the power t/n
  assert optim.decay_to_halflife(beta, n) == pytest.approx(t_half, rel=1e-9)


def test_paper_anchors():
  assert optim.rescale_decay(0.95, 512, 1) == pytest.approx(0.9998998, abs=1e-7)  # Fig. 1: "β2 = 0.9999"
  assert optim.rescale_decay(0.95, 16, 1) == pytest.approx(0.99680, abs=1e-5)  # Gemma, Fig. 8
  for batch, want in [(1, 0.999965), (64, 0.997731), (1024, 0.964312), (4096, 0.864708)]:
    assert optim.halflife_to_decay(10_000_000, batch * 512) == pytest.approx(want, abs=5e-7)
  # The half-life is what the rescaling keeps: 0.95 at 512 × 1024 tokens/step ≈ 7.08M tokens.
  assert optim.decay_to_halflife(0.95, 512 * 1024) == pytest.approx(7.08e6, rel=1e-3)
  assert optim.decay_to_halflife(optim.rescale_decay(0.95, 512, 1), 1024) == pytest.approx(
      optim.decay_to_halflife(0.95, 512 * 1024), rel=1e-9)


def test_one_minus_decay_is_float64_accurate():
  n, t = 512, 1e8
  with decimal.localcontext() as ctx:
    ctx.prec = 50
    exact = 1 - decimal.Decimal("0.5") ** (decimal.Decimal(n) / decimal.Decimal(t))
  exact = float(exact)
  ours = float(np.float32(optim.halflife_to_one_minus_decay(t, n)))
  assert abs(ours - exact) / exact < 1e-6
  # What float32 β would give instead: off by far more than the digest's 1e-3 bound.
  naive = float(np.float32(1.0) - np.float32(optim.halflife_to_decay(t, n)))
  assert abs(naive - exact) / exact > 1e-3


def test_edge_decays_and_validation():
  assert optim.decay_to_halflife(0.0, 512) == 0.0
  assert optim.decay_to_halflife(1.0, 512) == math.inf
  assert optim.halflife_to_decay(1.0, 10 * 1e6) == pytest.approx(0.0, abs=1e-300)  # β → 0 is allowed
  for call, match in [(lambda: optim.halflife_to_decay(0, 512), "t_half_tokens=0"),
                      (lambda: optim.halflife_to_decay(-5.0, 512), "t_half_tokens=-5.0"),
                      (lambda: optim.halflife_to_one_minus_decay(math.inf, 512), "finite"),
                      (lambda: optim.halflife_to_decay(1e7, 0), "tokens_per_step=0"),
                      (lambda: optim.decay_to_halflife(1.5, 512), "beta=1.5"),
                      (lambda: optim.decay_to_halflife(-0.1, 512), "beta=-0.1"),
                      (lambda: optim.rescale_decay(1.0, 512, 1), r"\[0, 1\)"),
                      (lambda: optim.rescale_decay(0.9, 512, -1), "new_tokens_per_step=-1")]:
    with pytest.raises(ValueError, match=match):
      call()


def test_resolved_betas():
  c = make_config(batch_size=64, b1=0.8, b2=0.99)
  assert optim.resolved_betas(c) == (0.8, 0.99)
  c.optim.b2_half_life_tokens = 1e7
  b1, b2 = optim.resolved_betas(c)
  assert (b1, b2) == (0.8, optim.halflife_to_decay(1e7, 64 * 512)) and type(b2) is float
  c.optim.b1_half_life_tokens = 2e5
  assert optim.resolved_betas(c)[0] == pytest.approx(0.8926, abs=1e-4)  # digest §1.5, batch 64
  info = optim.describe(c)
  assert info["b2_half_life_tokens"] == pytest.approx(1e7) and info["tokens_per_step"] == 64 * 512


# ----------------------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("batch", [1, 64])
def test_nu_is_batch_invariant_for_constant_gradient(batch):
  """B for 4k steps and 4B for k steps see the same tokens, so ν must agree: g²(1 − 0.5^(tokens/t2))."""
  k, t2 = 100, 1e7
  g = jnp.array([0.5, -2.0, 3e-3], jnp.float32)
  nus = []
  for b, steps in [(batch, 4 * k), (4 * batch, k)]:
    tx = optim.make_optimizer(make_config(batch_size=b, b2_half_life_tokens=t2), None)
    _, state, _ = run_steps(tx, jnp.zeros(3), jnp.broadcast_to(g, (steps, 3)))
    nus.append(np.asarray(adam_state(state).nu, np.float64))
  want = np.asarray(g, np.float64) ** 2 * -math.expm1(4 * k * batch * 512 * math.log(0.5) / t2)
  np.testing.assert_allclose(nus[0], want, rtol=2e-5)
  np.testing.assert_allclose(nus[1], want, rtol=2e-5)


@pytest.mark.parametrize("steps", [1000, 4000])
def test_impulse_response_halves_after_half_life(steps):
  """One gradient then zeros: ν_s/ν_1 = β₂^s, which is ½ when s·n = t2 (both Adam paths)."""
  n = 512
  tx = optim.make_optimizer(make_config(b2_half_life_tokens=float(steps * n)), None)
  grads = jnp.zeros((steps + 1, 2)).at[0].set(jnp.array([1.0, -3.0]))
  _, state, _ = run_steps(tx, jnp.zeros(2), grads)
  ratio = np.asarray(adam_state(state).nu) / (np.array([1.0, 9.0]) * optim.halflife_to_one_minus_decay(steps * n, n))
  np.testing.assert_allclose(ratio, 0.5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [dict(batch_size=256), dict(batch_size=1, b2_half_life_tokens=1e7),
                                       dict(batch_size=4096, b1_half_life_tokens=1e4, b2_half_life_tokens=1e5),
                                       dict(batch_size=1, b2_half_life_tokens=1e12), dict(b1=0.0, b2=0.0)])
def test_first_step_update_is_normalized_gradient(overrides):
  """Bias correction makes step 1 −lr·g/(|g|+ε) for any β. Where optax's arithmetic is kept (1−β ≥
  MIN_ONE_MINUS_BETA_F32), float32 β costs up to 1e-4 in 1−β^k (b2=0.999: 1.3e-5); the accurate path ~1e-7."""
  c = make_config(lr=0.01, **overrides)
  accurate = min(1 - b for b in optim.resolved_betas(c)) < optim.MIN_ONE_MINUS_BETA_F32
  g = jnp.array([1e-3, -2.0, 5.0], jnp.float32)
  tx = optim.make_optimizer(c, None)
  updates, _ = tx.update(g, tx.init(g), jnp.zeros(3))
  np.testing.assert_allclose(updates, -0.01 * g / (jnp.abs(g) + c.optim.eps), rtol=1e-6 if accurate else 5e-5)


@pytest.mark.parametrize("t2", [1e8, 2e10])
def test_extreme_beta2_stays_accurate_where_float32_optax_does_not(t2):
  """At batch 1, T=512, 1−β₂ ≈ 3.5e-6 (t2=1e8) or β₂ rounds to 1.0 in float32 (t2=2e10)."""
  c = make_config(lr=0.1, eps=0.0, b2_half_life_tokens=t2)
  g_K = jnp.broadcast_to(jnp.array([0.3, -7.0]), (10, 2))
  ours, _, _ = run_steps(optim.make_optimizer(c, None), jnp.zeros(2), g_K)
  np.testing.assert_allclose(ours, -0.1 * np.sign(g_K), rtol=1e-5)  # m̂ = g and ν̂ = g² exactly
  plain, _, _ = run_steps(optax.adamw(0.1, 0.9, optim.resolved_betas(c)[1], eps=0.0, weight_decay=0.0),
                          jnp.zeros(2), g_K)
  err = np.abs(np.asarray(plain) / np.asarray(ours) - 1)
  assert not np.all(err < 1e-3)  # NaN (β₂ == 1.0) or a visibly wrong step


def test_sign_descent_limit():
  c = make_config(lr=0.5, b1=0.0, b2=0.0, eps=0.0)
  g_K = jax.random.normal(jax.random.key(0), (5, 7))
  updates, _, _ = run_steps(optim.make_optimizer(c, None), jnp.zeros(7), g_K)
  np.testing.assert_allclose(updates, -0.5 * np.sign(g_K), rtol=1e-6)  # XLA's g/sqrt(g²) is 1 within an ulp
  acc, _, _ = run_steps(accurate_adam(0.0, 0.0, 0.0), jnp.zeros(7), g_K)
  np.testing.assert_allclose(acc, np.sign(g_K), rtol=1e-6)


def test_matches_optax_adamw_bit_for_bit_with_direct_betas():
  c = make_config(batch_size=4, seq_len=8, lr=3e-3, b1=0.85, b2=0.995, eps=1e-7, weight_decay=0.1,
                  warmup_tokens=96, schedule="cosine")
  params = {"w": jax.random.normal(jax.random.key(1), (4, 3)), "b": jnp.linspace(-1, 1, 3)}
  grads_K = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), (8,) + p.shape), params)
  ours_tx = optim.make_optimizer(c, 8)
  ref_tx = optax.adamw(optim.lr_schedule(c, 8), b1=0.85, b2=0.995, eps=1e-7, weight_decay=0.1)
  ours, ours_state, ours_params = run_steps(ours_tx, params, grads_K)
  ref, ref_state, ref_params = run_steps(ref_tx, params, grads_K)
  jax.tree.map(np.testing.assert_array_equal, (ours, ours_params), (ref, ref_params))
  assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
  # The accurate variant agrees to float32 rounding and keeps optax's state layout (checkpoints).
  acc_tx = optax.chain(accurate_adam(0.85, 0.995, 1e-7), optax.add_decayed_weights(0.1),
                       optax.scale_by_learning_rate(optim.lr_schedule(c, 8)))
  acc, acc_state, _ = run_steps(acc_tx, params, grads_K)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), acc, ref)
  assert jax.tree.structure(acc_state) == jax.tree.structure(ref_state)


def test_grad_clip_matches_optax_chain():
  c = make_config(lr=1e-2, b1=0.9, b2=0.99, grad_clip=1.0, weight_decay=0.02)
  g_K = 3.0 * jax.random.normal(jax.random.key(3), (4, 6))
  params = jnp.ones(6)
  ours, _, _ = run_steps(optim.make_optimizer(c, None), params, g_K)
  ref, _, _ = run_steps(optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.adamw(optim.lr_schedule(c, None), 0.9, 0.99, weight_decay=0.02)),
                        params, g_K)
  np.testing.assert_array_equal(ours, ref)


# Not with grad_clip > 0 or eps = 0: there XLA's algebraic simplifier folds the lone run's constants (clip scale
# × 1−β₁; a / sqrt(b) → a·rsqrt(b) without ε) and the packed step differs by an ulp (as before optim.adamw).
@pytest.mark.parametrize("overrides", [dict(b1=0.85, b2=0.995, eps=1e-7, weight_decay=0.1),
                                       dict(b2_half_life_tokens=1e8, weight_decay=0.02),
                                       dict(b1=0.3, b2_half_life_tokens=2e10)])
def test_traced_float32_hyperparams_reproduce_the_lone_chain_bit_for_bit(overrides):
  """A pack member's optimizer: optim.adamw from optim.hyperparams as float32 arguments of the jitted update
  (train/pack_step.py), bitwise equal to make_optimizer's chain with the same values as constants."""
  c = make_config(lr=3e-2, warmup_tokens=2048, **overrides)
  lone, schedule, kind = optim.make_optimizer(c, None), optim.lr_schedule(c, None), optim.adam_kind(c)
  hp = {k: np.float32(v) for k, v in optim.hyperparams(c).items()}
  packed = lambda hp, g, s, p: optim.adamw(kind, hp, c.optim.grad_clip, schedule).update(g, s, p)
  params = {"w": jax.random.normal(jax.random.key(1), (4, 3)), "b": jnp.linspace(-1, 1, 3)}
  state_a = state_b = lone.init(params)
  for k in range(6):
    g = jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.key(10 + k), p.shape), params)
    a, state_a = jax.jit(lone.update)(g, state_a, params)
    b, state_b = jax.jit(packed)(hp, g, state_b, params)
    jax.tree.map(np.testing.assert_array_equal, (a, state_a), (b, state_b))
    params = optax.apply_updates(params, a)


# ----------------------------------------------------------------------------------------- schedules

def test_schedule_shapes():
  c = make_config(batch_size=2, seq_len=50, lr=2e-3, warmup_tokens=1000)  # 10 warmup steps
  assert optim.warmup_steps(c) == 10
  const = optim.lr_schedule(c, None)
  assert [float(const(s)) for s in (0, 5, 10, 10_000)] == pytest.approx([0.0, 1e-3, 2e-3, 2e-3])
  c.optim.schedule = "cosine"
  cos = jax.jit(optim.lr_schedule(c, 110))
  assert [float(cos(s)) for s in (5, 10, 60, 110, 200)] == pytest.approx([1e-3, 2e-3, 1e-3, 0.0, 0.0], abs=1e-9)
  c.optim.schedule, c.optim.decay_fraction = "wsd", 0.25
  wsd = optim.lr_schedule(c, 200)
  assert [float(wsd(s)) for s in (10, 100, 150, 175, 200, 300)] == pytest.approx(
      [2e-3, 2e-3, 2e-3, 1e-3, 0.0, 0.0], abs=1e-9)
  c.optim.warmup_tokens = 1  # a warmup shorter than a step still lasts one step
  assert optim.warmup_steps(c) == 1 and float(optim.lr_schedule(c, 200)(0)) == 0.0


def test_schedule_errors():
  c = make_config(schedule="cosine")
  with pytest.raises(ConfigError, match="no fixed length"):
    optim.lr_schedule(c, None)
  c = make_config(batch_size=1, seq_len=100, schedule="wsd", warmup_tokens=9000, decay_fraction=0.2)
  optim.lr_schedule(c, 112)  # 90 warmup + 22 decay steps fit
  with pytest.raises(ConfigError, match="warmup_tokens=9000 is 90 steps"):
    optim.lr_schedule(c, 100)
  c.optim.schedule = "cosine"
  with pytest.raises(ConfigError, match="train for longer"):
    optim.lr_schedule(c, 90)
  with pytest.raises(ValueError, match="total_steps=0"):
    optim.lr_schedule(c, 0)
