import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay.errors import CheckpointError
from jaxreplay.models import decoder as M, export as export_lib

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
  assert np.std(params["blocks"]["up_proj"]) == pytest.approx(D ** -0.5, rel=0.05)
  assert np.std(params["blocks"]["q_proj"]) == pytest.approx(D ** -0.5, rel=0.05)
  assert np.std(params["blocks"]["down_proj"]) == pytest.approx(F ** -0.5, rel=0.05)
  assert set(params["blocks"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}  # no norm scales
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
  np.testing.assert_allclose(M.rms_norm(x, 0.0, jnp.array([2.0, -1.0])), np.asarray(x) / np.sqrt(12.5) * [2, -1], rtol=1e-6)
  q = jax.random.normal(jax.random.key(3), (1, 4, 1, 8))
  pos = jnp.arange(4)[None]
  inv = M.inv_frequencies(M.ModelConfig(head_dim=8))
  r = M.rope(q, pos, inv)
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation
  np.testing.assert_allclose(r[:, 0], q[:, 0], rtol=1e-6)  # position 0 is unrotated
  # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
  k = jax.random.normal(jax.random.key(4), (1, 1, 1, 8))
  def dot(m, n):
    return float(jnp.sum(M.rope(q[:, :1], jnp.array([[m]]), inv) * M.rope(k, jnp.array([[n]]), inv)))
  assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)


def test_remat_and_bf16_give_close_logits(params):
  toks = jax.random.randint(jax.random.key(5), (2, 16), 0, 50)
  ref = M.logits(TINY, params, toks)
  np.testing.assert_allclose(M.logits(dataclasses.replace(TINY, remat=True), params, toks), ref, atol=1e-5)
  bf = M.logits(dataclasses.replace(TINY, dtype=jnp.bfloat16), params, toks)
  assert bf.dtype == jnp.float32
  assert 1e-3 * float(jnp.abs(ref).max()) < float(jnp.abs(bf - ref).max()) < 0.1  # bf16 rounding, not none


def test_compile_time_does_not_grow_with_depth():
  """Scanned layers: the lowered program has one block body whatever the depth."""
  def size(L):
    cfg = M.ModelConfig(d_model=32, n_layers=L, head_dim=16, seq_len=8, vocab_size=20)
    p = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    return len(jax.jit(lambda p, t: M.logits(cfg, p, t)).lower(p, jnp.zeros((1, 8), jnp.int32)).as_text())
  assert size(8) == pytest.approx(size(2), rel=0.02)


# --- The block types as config fields ---------------------------------------------------------------------------
VARIANTS = {
    "paper": TINY,
    "llama": dataclasses.replace(TINY, n_kv_heads=2, mlp="swiglu", norm_scale=True, qk_norm=False, tie_embeddings=True,
                                 rope_base=5e5, rope_llama3=(8.0, 1.0, 4.0, 8.0), d_mlp=96),
    "qwen2": dataclasses.replace(TINY, n_kv_heads=1, mlp="swiglu", norm_scale=True, qk_norm=False, qkv_bias=True),
    "qwen3": dataclasses.replace(TINY, n_heads=2, n_kv_heads=1, mlp="swiglu", norm_scale=True),  # N·H ≠ D
}


def random_params(cfg, seed):
  """Every leaf random, biases and norm scales too, so that each config field changes the logits."""
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * (0.3 if len(s.shape) <= 3 else 0.25) + (
      1.0 if len(s.shape) <= 2 and s.shape[-1] in (cfg.d_model, cfg.head_dim) else 0.0), jnp.float32), shapes)


def np_forward(cfg, p, tokens):
  """A float64 numpy reference of the decoder, written from the configs' definitions (no flax)."""
  f = lambda x: np.asarray(x, np.float64)
  norm = lambda x, s=None: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * (1 if s is None else f(s))
  b, T = p["blocks"], tokens.shape[1]
  inv = f(M.inv_frequencies(cfg))
  ang = np.arange(T)[:, None] * inv
  rot = lambda x: np.concatenate([x[..., :len(inv)] * np.cos(ang)[:, None] - x[..., len(inv):] * np.sin(ang)[:, None],
                                  x[..., len(inv):] * np.cos(ang)[:, None] + x[..., :len(inv)] * np.sin(ang)[:, None]], -1)
  get = lambda name, l: f(b[name][l]) if name in b else None
  x = f(p["embed"])[tokens]
  for l in range(cfg.n_layers):
    h = norm(x, get("input_layernorm", l))
    q, k, v = (np.einsum("btd,dnh->btnh", h, get(n, l)) for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.qkv_bias:
      q, k, v = q + get("q_bias", l), k + get("k_bias", l), v + get("v_bias", l)
    if cfg.qk_norm:
      q, k = norm(q, get("q_norm", l)), norm(k, get("k_norm", l))
    q, k = rot(q), rot(k)
    k, v = np.repeat(k, cfg.n_groups, axis=2), np.repeat(v, cfg.n_groups, axis=2)  # query head n reads kv n // G
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim) + np.triu(np.full((T, T), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    x = x + np.einsum("bnts,bsnh,nhd->btd", a / a.sum(-1, keepdims=True), v, get("o_proj", l))
    h = norm(x, get("post_attention_layernorm", l))
    up = h @ get("up_proj", l)
    if cfg.mlp == "swiglu":
      g = h @ get("gate_proj", l)
      act = g / (1 + np.exp(-g)) * up
    else:
      act = np.asarray(jax.nn.gelu(up))
    x = x + act @ get("down_proj", l)
  unembed = f(p["embed"]).T if cfg.tie_embeddings else f(p["unembed"])
  return norm(x, p.get("norm")) @ unembed


@pytest.mark.parametrize("name", VARIANTS)
def test_every_block_type_matches_a_numpy_reference_and_its_cache(name):
  cfg = VARIANTS[name]
  p = random_params(cfg, 1)
  counts = M.param_counts(cfg)
  assert sum(x.size for x in jax.tree.leaves(p)) == counts["true"]
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, 50))
  full = jax.jit(lambda p, t: M.logits(cfg, p, t))(p, toks)
  np.testing.assert_allclose(full, np_forward(cfg, p, toks), atol=2e-4, rtol=1e-4)
  step = jax.jit(lambda p, t, c, i: M.apply(cfg, p, t, cache=c, cache_index=i))
  out, cache = step(p, toks[:, :5], M.init_cache(cfg, 2), 0)
  pieces = [out]
  for t in range(5, 16):
    out, cache = step(p, toks[:, t:t + 1], cache, t)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)


def test_fused_qkv_is_picked_where_it_fits_and_equals_three_projections():
  """The fused-qkv layout (one matmul on the concatenated kernels; parameters unchanged) is the config's choice
  for K = N without biases, refused elsewhere, and gives the three projections' logits and gradients, on default
  positions, on packed segments and through the cache."""
  assert TINY.qkv_fused and dataclasses.replace(VARIANTS["qwen3"], n_kv_heads=2).qkv_fused
  assert not any(VARIANTS[n].qkv_fused for n in ("llama", "qwen2", "qwen3"))
  with pytest.raises(ValueError, match="fuse_qkv=True needs"):
    dataclasses.replace(VARIANTS["qwen2"], fuse_qkv=True)
  general = dataclasses.replace(TINY, fuse_qkv=False)
  p = random_params(TINY, 3)
  toks = np.asarray(jax.random.randint(jax.random.key(4), (2, 16), 0, 50))
  segs = np.repeat([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0]], 2, 0)
  for kw in ({}, dict(segments_BT=segs, positions_BT=M.segment_positions(segs))):
    loss = lambda cfg, p: (M.logits(cfg, p, toks, **kw) ** 2).mean()
    fused, ref = (jax.jit(jax.value_and_grad(lambda p, c=c: loss(c, p)))(p) for c in (TINY, general))
    np.testing.assert_allclose(fused[0], ref[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(ref[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  steps = [M.apply(c, p, toks[:, :5], cache=M.init_cache(c, 2), cache_index=0)[0] for c in (TINY, general)]
  np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5, atol=1e-5)


def test_a_format_1_export_loads_converted(tmp_path):
  """An export of the paper model written before the decoders became one: fused {qkv, out, up, down} leaves and
  no params_format in info.json. It loads as this decoder's parameters and gives the same logits as the old
  model's arithmetic (the numpy reference on the same numbers)."""
  import json
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(3)
  L, D, N, H, F, V = TINY.n_layers, TINY.d_model, TINY.n_heads, TINY.head_dim, TINY.d_mlp, TINY.vocab_size
  old = dict(embed=rng.normal(size=(V, D)), unembed=rng.normal(size=(D, V)) * D ** -0.5,
             blocks=dict(qkv=rng.normal(size=(L, D, 3, N, H)) * D ** -0.5, out=rng.normal(size=(L, N, H, D)) * D ** -0.5,
                         up=rng.normal(size=(L, D, F)) * D ** -0.5, down=rng.normal(size=(L, F, D)) * F ** -0.5))
  old = jax.tree.map(lambda x: np.asarray(x, np.float32), old)
  export = tmp_path / "export"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(export / "params"), old)
  ckptr.wait_until_finished()
  ckptr.close()
  (export / "config.json").write_text(json.dumps(dict(model=dict(d_model=D))))
  (export / "info.json").write_text(json.dumps(dict(step=1, dataset_id=0)))
  like = jax.eval_shape(lambda: M.init_params(TINY, jax.random.key(0)))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), like)
  params = export_lib.load_exported(str(tmp_path), like)
  np.testing.assert_array_equal(params["blocks"]["k_proj"], old["blocks"]["qkv"][:, :, 1])
  toks = np.asarray(jax.random.randint(jax.random.key(4), (2, 16), 0, V))
  fused = dict(old, blocks=dict(q_proj=old["blocks"]["qkv"][:, :, 0], k_proj=old["blocks"]["qkv"][:, :, 1],
                                v_proj=old["blocks"]["qkv"][:, :, 2], o_proj=old["blocks"]["out"],
                                up_proj=old["blocks"]["up"], down_proj=old["blocks"]["down"]))
  np.testing.assert_allclose(M.logits(TINY, params, toks), np_forward(TINY, fused, toks), atol=2e-4, rtol=1e-4)
  with pytest.raises(CheckpointError, match="do not fit"):
    export_lib.load_exported(str(tmp_path), jax.eval_shape(lambda: M.init_params(VARIANTS["llama"], jax.random.key(0))))


class OldBlock(nn.Module):
  """The paper model's parameter declarations at commit 266e90b (fused qkv), for the init-compat check."""
  cfg: M.ModelConfig

  @nn.compact
  def __call__(self, x, _):
    D, N, H, F = self.cfg.d_model, self.cfg.n_heads, self.cfg.head_dim, self.cfg.d_mlp
    normal = nn.initializers.normal
    self.param("qkv", normal(D ** -0.5), (D, 3, N, H), jnp.float32)
    self.param("out", normal(D ** -0.5), (N, H, D), jnp.float32)
    self.param("up", normal(D ** -0.5), (D, F), jnp.float32)
    self.param("down", normal(F ** -0.5), (F, D), jnp.float32)
    return x, None


class OldTransformer(nn.Module):
  cfg: M.ModelConfig

  @nn.compact
  def __call__(self, tokens):
    D, V = self.cfg.d_model, self.cfg.vocab_size
    self.param("embed", nn.initializers.normal(D ** -0.5), (V, D), jnp.float32)
    nn.scan(OldBlock, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
            length=self.cfg.n_layers)(self.cfg, name="blocks")(jnp.zeros((1, D)), None)
    self.param("unembed", nn.initializers.normal(D ** -0.5), (D, V), jnp.float32)
    return tokens


@pytest.mark.parametrize("cfg", [TINY, M.ModelConfig(d_model=128, n_layers=4, head_dim=32, seq_len=128)])
def test_paper_init_draws_what_the_fused_qkv_model_drew(cfg):
  """A fresh paper model equals the old (fused-qkv) model's init at the same key, split into q, k, v: every
  leaf, bit for bit, so `make quickstart` prints the numbers it printed before the decoders became one."""
  key = jax.random.key(7)
  old = OldTransformer(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
  new = M.init_params(cfg, key)
  assert set(new["blocks"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
  np.testing.assert_array_equal(new["embed"], old["embed"])
  np.testing.assert_array_equal(new["unembed"], old["unembed"])
  np.testing.assert_array_equal(M.upgrade_params(old)["blocks"]["q_proj"], old["blocks"]["qkv"][:, :, 0])
  for name, leaf in M.upgrade_params(old)["blocks"].items():
    np.testing.assert_array_equal(new["blocks"][name], leaf, err_msg=name)
