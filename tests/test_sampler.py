"""The KV-cache sampler against a naive sampler, greedy decoding, and exactly known distributions."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay.errors import SamplingError
from jaxreplay.models import decode
from jaxreplay.models import decoder as M
from jaxreplay.models import sampler as S

TINY = M.ModelConfig(d_model=32, n_layers=2, head_dim=8, seq_len=12, vocab_size=50)


def np_params(cfg, seed, scale=1.0):
  """Random parameters of the model's shapes, made on the host (no compilation)."""
  shapes = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape) / math.sqrt(s.shape[-2] if s.ndim > 1 else 1))
                      .astype(np.float32), shapes)


@pytest.fixture(scope="module")
def params():
  return np_params(TINY, 0, scale=2.0)  # a peaky model: sampled rows differ clearly from each other


@pytest.fixture(scope="module")
def full_logits():
  return jax.jit(lambda p, t: M.logits(TINY, p, t))


def naive_sample(full_logits, params, prompt, u_TB, sc):
  """A full forward pass over the whole row for every new token; the same uniforms as the sampler."""
  B, Pl = prompt.shape
  T = u_TB.shape[0]
  pick = jax.jit(lambda u, lg: S.sample_from_logits(u, lg, sc))
  tokens = np.full((B, T), sc.pad_id, np.int32)
  tokens[:, :Pl] = prompt
  done = np.zeros(B, bool)
  for pos in range(Pl, T):
    logits = full_logits(params, jnp.asarray(tokens))[:, pos - 1]  # causal: later (pad) tokens do not matter
    tok = np.asarray(pick(u_TB[pos], logits))
    if sc.eos_id >= 0:
      tok = np.where(done, sc.pad_id, tok)
      done |= tok == sc.eos_id
    tokens[:, pos] = tok
  return tokens


def test_decode_step_matches_full_forward(params, full_logits):
  toks = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50))
  full = full_logits(params, toks)
  w = decode.decode_weights(TINY, params)
  empty = dict(k=jnp.zeros((TINY.n_layers, 4, 0, TINY.n_heads, TINY.head_dim)))
  cache = decode.heads_minor_cache(TINY, dict(empty, v=empty["k"]), 4, 12, lambda x, _: x)
  rope = decode.rope_table(TINY, 12)
  step = jax.jit(lambda c, t, p: decode.heads_minor_step(TINY, w, c, t, p, 12, rope))
  outs = []
  for t in range(12):
    lg, cache = step(cache, toks[:, t], t)
    outs.append(lg)
  np.testing.assert_allclose(np.stack(outs, 1), full, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("sc,chunks", [(S.SamplingConfig(temperature=1.0), 1),
                                       (S.SamplingConfig(temperature=0.7, top_k=5), 3)])
def test_cached_sampling_equals_naive_sampling(params, full_logits, sc, chunks):
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (4, 3), 0, 50), np.int32)  # any 3-token prefix
  sampler = S.make_sampler(TINY, sc, 4, 3, 12, chunks=chunks)
  key = jax.random.key(7)
  got = np.asarray(sampler(params, prompt, key))
  want = naive_sample(full_logits, params, prompt, sampler.uniforms(key), sc)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :3], prompt)
  assert len({tuple(r) for r in got[:, 3:]}) > 1  # rows differ: each has its own uniforms
  np.testing.assert_array_equal(np.asarray(sampler(params, prompt, key)), got)  # deterministic for a key
  assert not np.array_equal(np.asarray(sampler(params, prompt, jax.random.key(8))), got)


@pytest.mark.parametrize("prompt_len,sc", [(1, S.SamplingConfig()), (3, S.SamplingConfig(temperature=0.7, top_k=5))])
def test_returned_logits_are_the_full_forward_on_the_sampled_rows(params, full_logits, prompt_len, sc):
  """Raw logits (before temperature/top-k) predicting each next token; the last position holds zeros."""
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (4, prompt_len), 0, 50), np.int32)
  key = jax.random.key(9)
  tokens, logits = S.make_sampler(TINY, sc, 4, prompt_len, 12, chunks=2, return_logits=True)(params, prompt, key)
  np.testing.assert_array_equal(tokens, S.make_sampler(TINY, sc, 4, prompt_len, 12, chunks=2)(params, prompt, key))
  assert logits.shape == (4, 12, 50) and logits.dtype == np.float32
  np.testing.assert_allclose(logits[:, :-1], full_logits(params, tokens)[:, :-1], rtol=1e-4, atol=1e-4)
  assert not np.any(np.asarray(logits[:, -1]))
  assert S.make_sampler(TINY, sc, 4, prompt_len, 12, None, 2, False) is S.make_sampler(TINY, sc, 4, prompt_len, 12,
                                                                                          chunks=2)


def test_temperature_to_zero_is_greedy(params, full_logits):
  prompt = np.full((4, 1), 3, np.int32)
  greedy = np.asarray(S.make_sampler(TINY, S.SamplingConfig(temperature=0.0), 4, 1, 12)(params, prompt, jax.random.key(0)))
  cold = np.asarray(S.make_sampler(TINY, S.SamplingConfig(temperature=1e-4), 4, 1, 12)(params, prompt, jax.random.key(5)))
  tokens = np.zeros((4, 12), np.int32)
  tokens[:, 0] = 3
  for pos in range(1, 12):  # greedy by hand: argmax of a full forward pass
    tokens[:, pos] = np.argmax(full_logits(params, jnp.asarray(tokens))[:, pos - 1], -1)
  np.testing.assert_array_equal(greedy, tokens)
  np.testing.assert_array_equal(cold, tokens)


def test_eos_stops_rows_and_pads_the_rest(params, full_logits):
  prompt = np.full((8, 1), 4, np.int32)
  free = np.asarray(S.make_sampler(TINY, S.SamplingConfig(), 8, 1, 12)(params, prompt, jax.random.key(3)))
  eos = int(np.bincount(free[:, 1:].ravel(), minlength=50).argmax())  # a token that occurs: some rows stop
  sc = S.SamplingConfig(eos_id=eos, pad_id=0)
  stopped = np.asarray(S.make_sampler(TINY, sc, 8, 1, 12)(params, prompt, jax.random.key(3)))
  n_stopped = 0
  for row_free, row in zip(free, stopped):
    hits = np.flatnonzero(row_free[1:] == eos)
    if len(hits) == 0:
      np.testing.assert_array_equal(row, row_free)
      continue
    end = hits[0] + 2  # through the first EOS
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert np.all(row[end:] == 0)
    n_stopped += 1
  assert n_stopped >= 1


# --- One sampler for every block type -------------------------------------------------------------------------
# Llama/Qwen's fields: grouped key/value heads, SwiGLU, learned norm scales, q/k/v biases, tied embeddings, RoPE
# with Llama-3 scaling.
LLAMA = dataclasses.replace(TINY, n_heads=4, n_kv_heads=2, mlp="swiglu", norm_scale=True, qk_norm=False,
                            qkv_bias=True, tie_embeddings=True, rope_base=5e5, rope_llama3=(8.0, 1.0, 4.0, 4.0))
QWEN3 = dataclasses.replace(TINY, n_heads=2, n_kv_heads=1, mlp="swiglu", norm_scale=True, d_mlp=48)  # N·H ≠ D


def scaled_params(cfg, seed):
  p = np_params(cfg, seed, scale=2.0)
  if cfg.norm_scale:  # scales near 1, biases small: a peaky model whose every field matters
    p = jax.tree_util.tree_map_with_path(lambda path, x: 1.0 + 0.3 * x if "norm" in str(path[-1]) else (
        0.3 * x if "bias" in str(path[-1]) else x), p)
  return p


@pytest.mark.parametrize("cfg", [TINY, LLAMA, QWEN3], ids=["paper", "llama", "qwen3"])
def test_the_cpu_cache_layout_equals_the_general_path(cfg):
  """The [S, H, B·N] layout (picked on CPU) and the decoder's own cache give the same rows and logits."""
  assert decode.default_layout("cpu") == "heads_minor" and decode.default_layout("gpu") == "general"
  p = scaled_params(cfg, 3)
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (4, 2), 0, 50), np.int32)
  sc = S.SamplingConfig(temperature=0.8)
  out = {layout: S.make_sampler(cfg, sc, 4, 2, 12, return_logits=True, layout=layout)(p, prompt, jax.random.key(3))
         for layout in decode.LAYOUTS}
  np.testing.assert_array_equal(out["general"][0], out["heads_minor"][0])
  np.testing.assert_allclose(out["general"][1], out["heads_minor"][1], atol=2e-5, rtol=1e-5)
  full = jax.jit(lambda p, t: M.logits(cfg, p, t))(p, out["general"][0])
  np.testing.assert_allclose(out["heads_minor"][1][:, :-1], full[:, :-1], atol=1e-4, rtol=1e-4)
  assert len({tuple(r) for r in np.asarray(out["general"][0])}) > 1


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["paper", "llama"])
def test_a_prompt_holding_the_pad_id_keeps_it_as_a_token(cfg):
  """The pad id 0 is also the pretraining data's dataset id (reserved ids 0-9): prompt slots holding it are
  prompt, never free slots to write. The sampler writes by position: the rows equal a naive sampler's, in which
  the model reads those 0s as tokens, and equal the rows sampled with a pad id no prompt holds."""
  p = scaled_params(cfg, 4)
  full = jax.jit(lambda p, t: M.logits(cfg, p, t))
  prompt = np.array([[0, 0, 7], [5, 0, 0], [0, 3, 0], [0, 0, 0]], np.int32)
  key, sc = jax.random.key(6), S.SamplingConfig(pad_id=0)
  sampler = S.make_sampler(cfg, sc, 4, 3, 12)
  got = np.asarray(sampler(p, prompt, key))
  np.testing.assert_array_equal(got[:, :3], prompt)
  np.testing.assert_array_equal(got, naive_sample(full, p, prompt, sampler.uniforms(key), sc))
  np.testing.assert_array_equal(got, S.make_sampler(cfg, S.SamplingConfig(pad_id=49), 4, 3, 12)(p, prompt, key))
  # With an EOS stop, pad 0 fills the stopped rows only after their EOS; the prompt's 0s stay.
  eos = int(np.bincount(got[:, 3:].ravel(), minlength=50).argmax())
  stopped = np.asarray(S.make_sampler(cfg, S.SamplingConfig(pad_id=0, eos_id=eos), 4, 3, 12)(p, prompt, key))
  np.testing.assert_array_equal(stopped[:, :3], prompt)
  for row_free, row in zip(got, stopped):
    end = 3 + np.flatnonzero(row_free[3:] == eos)[0] + 1 if eos in row_free[3:] else 12
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert np.all(row[end:] == 0)


# --- Exactly known distributions ------------------------------------------------------------------------------
# With every block weight zero, attention and MLP add nothing: logits = rms_norm(embed[prev]) · scale @ unembed,
# so each token depends only on the previous one, through a transition matrix computed here in float64.
V = 8
MARKOV = M.ModelConfig(d_model=16, n_layers=1, head_dim=8, seq_len=3, vocab_size=V)
MARKOV_LLAMA = dataclasses.replace(MARKOV, n_kv_heads=1, mlp="swiglu", norm_scale=True, qkv_bias=True,
                                   tie_embeddings=True, rope_llama3=(8.0, 1.0, 4.0, 2.0))


def markov_params(cfg):
  p = np_params(cfg, 1)
  p["blocks"] = jax.tree.map(np.zeros_like, p["blocks"])
  if cfg.tie_embeddings:
    p["norm"] = p["norm"] * 1.5 + 0.5
  else:
    p["unembed"] = p["unembed"] * 1.5
  return p


def transition_logits(cfg, p):
  e = p["embed"].astype(np.float64)
  h = e / np.sqrt(np.mean(e * e, -1, keepdims=True) + cfg.norm_eps)
  if cfg.norm_scale:
    h = h * p["norm"].astype(np.float64)
  return h @ (e.T if cfg.tie_embeddings else p["unembed"].astype(np.float64))


def softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def chi2_critical(df, z=4.265):  # upper 1e-5 quantile (Wilson–Hilferty): a false failure once in 100,000 runs
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def check_frequencies(samples, probs):
  counts = np.bincount(samples, minlength=len(probs))
  support = probs > 0
  assert np.all(counts[~support] == 0), (counts, probs)
  if support.sum() == 1:
    return
  n = len(samples)
  stat = np.sum((counts[support] - n * probs[support]) ** 2 / (n * probs[support]))
  assert stat < chi2_critical(int(support.sum()) - 1), (stat, counts, n * probs)


def truncated(logits, top_k=0, top_p=1.0):
  order = np.argsort(-logits)
  keep = np.zeros_like(logits, bool)
  keep[order[:top_k or len(logits)]] = True
  if top_p < 1:
    p = softmax(np.where(keep, logits, -np.inf))[order]
    before = np.cumsum(p) - p
    keep[order[before >= top_p]] = False
  return softmax(np.where(keep, logits, -np.inf))


@pytest.mark.parametrize("cfg", [MARKOV, MARKOV_LLAMA], ids=["paper", "llama"])
@pytest.mark.parametrize("sc", [S.SamplingConfig(temperature=1.0), S.SamplingConfig(temperature=0.6),
                                S.SamplingConfig(top_k=3), S.SamplingConfig(top_p=0.6)])
def test_empirical_frequencies_match_the_exact_distribution(cfg, sc):
  p = markov_params(cfg)
  logits = transition_logits(cfg, p) / sc.temperature
  B, first = 6000, 2
  out = np.asarray(S.make_sampler(cfg, sc, B, 1, 3)(p, np.full((B, 1), first, np.int32), jax.random.key(11)))
  dist = np.stack([truncated(lg, sc.top_k, sc.top_p) for lg in logits])
  check_frequencies(out[:, 1], dist[first])
  if sc.top_k:
    assert (dist > 0).sum(-1).max() == sc.top_k
  if sc.top_p < 1:
    assert (dist[first] > 0).sum() < V
  # The second token given the first: the rows of the transition matrix, for the commonest first tokens.
  for prev in np.argsort(-np.bincount(out[:, 1], minlength=V))[:2]:
    check_frequencies(out[out[:, 1] == prev, 2], dist[prev])


def test_bad_arguments_are_refused():
  with pytest.raises(SamplingError, match="prompt length"):
    S.make_sampler(TINY, S.SamplingConfig(), 2, 13, 12)
  with pytest.raises(SamplingError, match="top_p"):
    S.make_sampler(TINY, S.SamplingConfig(top_p=0.0), 2, 1, 12)
  with pytest.raises(SamplingError, match="eos_id"):
    S.make_sampler(TINY, S.SamplingConfig(eos_id=50), 2, 1, 12)
  with pytest.raises(SamplingError, match="layout"):
    S.make_sampler(TINY, S.SamplingConfig(), 2, 1, 12, layout="rows_minor")


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import ml_collections
    sys.path.insert(0, "tests")
    from test_sampler import TINY, np_params
    from jaxreplay import sharding
    from jaxreplay.models import decoder as M, sampler as S
    out = {}
    for name, mesh_cfg in (("one", None), ("four", dict(data=2, fsdp=2, tensor=1)),
                           ("tensor", dict(data=1, fsdp=2, tensor=2))):
      mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg or dict(data=1, fsdp=1, tensor=1)),
                                jax.devices()[:1] if mesh_cfg is None else None)
      p = np_params(TINY, 0, 2.0)
      p = jax.device_put(p, sharding.param_shardings(p, mesh))
      toks = S.sample(TINY, p, np.full((8, 1), 5, np.int32), jax.random.key(4), sc=S.SamplingConfig(), mesh=mesh)
      out[name] = dict(tokens=np.asarray(toks).tolist(), spec=str(toks.sharding.spec))
      if name == "four":  # the logits buffer too, sharded like the rows
        sampler = S.make_sampler(TINY, S.SamplingConfig(), 8, 1, 12, mesh, return_logits=True)
        toks, logits = sampler(p, sharding.put_batch(np.full((8, 1), 5, np.int32), mesh), jax.random.key(4))
        full = jax.jit(lambda p, t: M.logits(TINY, p, t))(np_params(TINY, 0, 2.0), np.asarray(toks))
        out["logits"] = dict(tokens=np.asarray(toks).tolist(), spec=str(logits.sharding.spec),
                             err=float(np.abs(np.asarray(logits)[:, :-1] - np.asarray(full)[:, :-1]).max()))
    print(json.dumps(out))
""")


def test_sharded_over_the_data_axes_gives_the_same_samples():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["four"]["tokens"] == out["one"]["tokens"]
  assert out["tensor"]["tokens"] == out["one"]["tokens"]  # heads split over the tensor axis
  assert "data" in out["four"]["spec"] and "fsdp" in out["four"]["spec"]
  assert out["logits"]["tokens"] == out["one"]["tokens"] and out["logits"]["err"] < 1e-4
  assert "data" in out["logits"]["spec"] and "fsdp" in out["logits"]["spec"]
