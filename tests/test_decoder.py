import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay import model as M

TINY = M.ModelConfig(d_model=64, n_layers=2, head_dim=16, seq_len=16, vocab_size=50)


@pytest.fixture(scope="module")
def params():
  return M.init_params(TINY, jax.random.key(0))


def test_paper_parameter_counts():
  big = M.param_counts(M.ModelConfig(d_model=1024, n_layers=16, vocab_size=4096))
  assert big["paper"] == 205_520_896
  assert big["true"] == 205_520_896 + 1024 * 4096
  toy = M.param_counts(M.ModelConfig(d_model=256, n_layers=2, head_dim=16, vocab_size=19))
  assert toy["true"] == pytest.approx(1.58e6, rel=0.01)
  six = M.param_counts(M.ModelConfig(d_model=256, n_layers=6))
  assert six["paper"] == 5_767_168


def test_true_count_matches_parameter_tree(params):
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == M.param_counts(TINY)["true"]


def test_init_scales(params):
  D, F = TINY.d_model, TINY.d_mlp
  assert np.std(params["blocks"]["up"]) == pytest.approx(D ** -0.5, rel=0.05)
  assert np.std(params["blocks"]["down"]) == pytest.approx(F ** -0.5, rel=0.05)
  assert np.std(params["embed"]) == pytest.approx(D ** -0.5, rel=0.05)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_causality(params):
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  base = M.logits(TINY, params, toks)
  for t in (0, 5, 15):
    changed = toks.at[:, t].set((toks[:, t] + 1) % 50)
    out = M.logits(TINY, params, changed)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t:], base[:, t:])


def test_decode_with_cache_matches_full_forward(params):
  toks = jax.random.randint(jax.random.key(2), (3, 16), 0, 50)
  full = M.logits(TINY, params, toks)
  cache = M.init_cache(TINY, 3)
  out, cache = M.apply(TINY, params, toks[:, :6], cache=cache, cache_index=0)  # prefill
  pieces = [out]
  step = jax.jit(lambda p, t, c, i: M.apply(TINY, p, t, cache=c, cache_index=i))
  for t in range(6, 16):
    out, cache = step(params, toks[:, t:t + 1], cache, t)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)


def test_rms_norm_and_rope_closed_forms():
  x = jnp.array([[3.0, 4.0]])
  np.testing.assert_allclose(M.rms_norm(x, 0.0), x / np.sqrt(12.5), rtol=1e-6)
  q = jax.random.normal(jax.random.key(3), (1, 4, 1, 8))
  pos = jnp.arange(4)[None]
  r = M.rope(q, pos, 10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation
  np.testing.assert_allclose(r[:, 0], q[:, 0], rtol=1e-6)  # position 0 is unrotated
  # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
  k = jax.random.normal(jax.random.key(4), (1, 1, 1, 8))
  def dot(m, n):
    return float(jnp.sum(M.rope(q[:, :1], jnp.array([[m]]), 1e4) * M.rope(k, jnp.array([[n]]), 1e4)))
  assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)


def test_remat_and_bf16_give_close_logits(params):
  toks = jax.random.randint(jax.random.key(5), (2, 16), 0, 50)
  ref = M.logits(TINY, params, toks)
  import dataclasses
  np.testing.assert_allclose(M.logits(dataclasses.replace(TINY, remat=True), params, toks), ref, atol=1e-5)
  bf = M.logits(dataclasses.replace(TINY, dtype=jnp.bfloat16), params, toks)
  assert bf.dtype == jnp.float32
  assert float(jnp.abs(bf - ref).max()) < 0.1


def test_compile_time_does_not_grow_with_depth():
  """Scanned layers: the lowered program has one block body whatever the depth."""
  def size(L):
    cfg = M.ModelConfig(d_model=32, n_layers=L, head_dim=16, seq_len=8, vocab_size=20)
    p = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    return len(jax.jit(lambda p, t: M.logits(cfg, p, t)).lower(p, jnp.zeros((1, 8), jnp.int32)).as_text())
  assert size(8) == pytest.approx(size(2), rel=0.02)
