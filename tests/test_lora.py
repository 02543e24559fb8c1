import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib
from jaxreplay import sharding
from jaxreplay.train import steps
from jaxreplay.models import decoder as M
from jaxreplay.models import lora

TINY = M.ModelConfig(d_model=32, n_layers=2, head_dim=8, seq_len=16, vocab_size=40)


def lora_cfg(rank=4, alpha=0.0):
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha))


@pytest.fixture(scope="module")
def frozen():
  return jax.jit(M.init_params, static_argnums=0)(TINY, jax.random.key(0))


def test_merged_equals_frozen_at_init_and_embeddings_untouched(frozen):
  trainable_fn, merge_fn = lora.parameterization(lora_cfg(), jax.random.key(1))
  adapters = jax.jit(trainable_fn)(frozen)
  merged = jax.jit(merge_fn)(adapters, frozen)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  assert set(adapters["blocks"]) == {"qkv", "out", "up", "down"}
  assert "embed" not in adapters and "unembed" not in adapters


def test_adapter_shapes_init_and_count(frozen):
  r = 4
  adapters = jax.jit(lora.init_adapters, static_argnums=1)(frozen, r, jax.random.key(1))
  D, F, L = TINY.d_model, TINY.d_mlp, TINY.n_layers
  NH = TINY.n_heads * TINY.head_dim
  fans = dict(qkv=(D, 3 * NH), out=(NH, D), up=(D, F), down=(F, D))
  for name, (fi, fo) in fans.items():
    assert adapters["blocks"][name]["lora_a"].shape == (L, fi, r)
    assert adapters["blocks"][name]["lora_b"].shape == (L, r, fo)
    assert not np.any(adapters["blocks"][name]["lora_b"])
  big = lora.init_adapters(dict(blocks={n: jnp.zeros((2, 256, 1024)) for n in ("q_proj", "k_proj", "v_proj",
                                                                               "o_proj", "up_proj", "down_proj")}),
                           64, jax.random.key(2))
  assert np.std(big["blocks"]["up"]["lora_a"]) == pytest.approx(256 ** -0.5, rel=0.03)
  # r · Σ(fan_in + fan_out) per layer, by hand for D=32, N·H=32, F=128: (32+96)+(32+32)+(32+128)+(128+32) = 512.
  assert lora.count(adapters) == L * r * 512 == lora.expected_count(TINY, r)


def test_grouped_heads_and_swiglu_adapt_every_matrix():
  """A Llama-type block: q/k/v of different widths (K < N) share one adapter, gate and up another."""
  import dataclasses
  cfg = dataclasses.replace(TINY, n_kv_heads=2, mlp="swiglu", norm_scale=True, qk_norm=False)
  frozen = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  frozen = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), frozen)
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init_adapters(frozen, 2, jax.random.key(1)))
  D, F, H = cfg.d_model, cfg.d_mlp, cfg.head_dim
  assert adapters["blocks"]["qkv"]["lora_b"].shape == (cfg.n_layers, 2, (4 + 2 * 2) * H)
  assert adapters["blocks"]["up"]["lora_b"].shape == (cfg.n_layers, 2, 2 * F)
  assert lora.count(adapters) == lora.expected_count(cfg, 2)
  merged = lora.merge(adapters, frozen, 1.0)
  up = adapters["blocks"]["up"]
  delta = up["lora_a"][0] @ up["lora_b"][0]
  np.testing.assert_allclose(merged["blocks"]["gate_proj"][0], delta[:, :F], rtol=1e-6)
  np.testing.assert_allclose(merged["blocks"]["up_proj"][0], delta[:, F:], rtol=1e-6)
  assert merged["blocks"]["k_proj"].shape == (cfg.n_layers, D, 2, H)
  np.testing.assert_array_equal(merged["blocks"]["input_layernorm"], frozen["blocks"]["input_layernorm"])


def test_scale_and_merge_formula(frozen):
  assert lora.scale(lora_cfg(4, 0.0)) == 1.0
  assert lora.scale(lora_cfg(4, 8.0)) == 2.0
  adapters = lora.init_adapters(frozen, 3, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero B
  merged = jax.jit(lora.merge, static_argnums=2)(adapters, frozen, 2.0)
  qkv = adapters["blocks"]["qkv"]
  delta = 2.0 * (qkv["lora_a"][1] @ qkv["lora_b"][1])  # [D, 3·N·H]: q, k, v side by side
  for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
    w = frozen["blocks"][name][1]
    want = w + delta[:, i * w[0].size:(i + 1) * w[0].size].reshape(w.shape)
    np.testing.assert_allclose(merged["blocks"][name][1], want, rtol=1e-5, atol=1e-6)
  out = adapters["blocks"]["out"]
  w = frozen["blocks"]["o_proj"][0]
  want = w + 2.0 * (out["lora_a"][0] @ out["lora_b"][0]).reshape(w.shape)
  np.testing.assert_allclose(merged["blocks"]["o_proj"][0], want, rtol=1e-5, atol=1e-6)


def test_gradient_flows_only_to_adapters(frozen):
  trainable_fn, merge_fn = lora.parameterization(lora_cfg(), jax.random.key(1))
  adapters = trainable_fn(frozen)
  tokens = jax.random.randint(jax.random.key(3), (4, 16), 0, 40)
  objective = steps.make_objective(TINY, None, merge_fn)
  grads = jax.jit(jax.grad(lambda a, f: objective(a, f, tokens, None)[0], argnums=(0, 1)))(adapters, frozen)
  g_adapters, g_frozen = grads
  assert all(not np.any(g) for g in jax.tree.leaves(g_frozen))  # the pretrained weights get nothing
  for name, g in g_adapters["blocks"].items():
    assert np.any(g["lora_b"]), name  # B receives gradient through A
    assert not np.any(g["lora_a"]), name  # ...and A none while B = 0


def test_a_few_steps_reduce_the_loss(frozen):
  trainable_fn, merge_fn = lora.parameterization(lora_cfg(rank=8), jax.random.key(1))
  optimizer = optax.adam(1e-2)
  state = jax.jit(lambda k: steps.init_state(TINY, optimizer, k, trainable_fn))(jax.random.key(0))
  objective = steps.make_objective(TINY, None, merge_fn)
  step = jax.jit(steps.make_train_step(objective, optimizer, lambda s: 1e-2))
  tokens = jax.random.randint(jax.random.key(4), (8, 16), 0, 40)
  losses = []
  for _ in range(15):
    state, aux = step(state, frozen, tokens, None)
    losses.append(float(aux["train_loss"]))
  assert losses[-1] < losses[0] - 0.3, losses
  merged = jax.jit(merge_fn)(state["params"], frozen)
  np.testing.assert_array_equal(merged["embed"], frozen["embed"])
  assert not np.allclose(merged["blocks"]["up_proj"], frozen["blocks"]["up_proj"])


def test_adapters_are_replicated_and_rank_zero_is_refused(frozen):
  """On a 2×2×2 mesh (abstract: shardings depend only on axis sizes) the frozen weights are sharded while the
  adapters, a few thousand numbers, stay whole on every device."""
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)
  adapters = lora.init_adapters(frozen, 2, jax.random.key(1))
  specs = sharding.param_shardings(adapters, mesh)
  assert jax.tree.leaves(specs) and all(all(d is None for d in s.spec) for s in jax.tree.leaves(specs))
  frozen_specs = sharding.param_shardings(frozen, mesh)
  assert any(d is not None for s in jax.tree.leaves(frozen_specs) for d in s.spec)  # the mesh does shard
  with pytest.raises(ConfigError, match="lora.rank"):
    lora.parameterization(lora_cfg(rank=0), jax.random.key(0))
