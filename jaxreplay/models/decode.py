"""One-token decode steps for the sampler, over either of two KV-cache layouts (`LAYOUTS`).

- "general": the decoder's own `apply` on its [L, B, S, K, H] cache, one call per token.
- "heads_minor" (XLA:CPU, see docs/performance.md): per layer k, v [S, H, B·N] with every (row, query head)
  pair as the minor dimension, layers unrolled and attention as a multiply-reduce over the first `span`
  entries. XLA:CPU's loops vectorise the minor dimension only; slicing the major one is free. Grouped
  key/value heads are repeated to the N query heads when written, so it fits every block type of the decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreplay import platform as platform_lib
from jaxreplay.models import decoder as dec

LAYOUTS = platform_lib.CACHE_LAYOUTS


def default_layout(platform: str) -> str:
  """The cache layout the sampler uses on `platform` (`platform.choices`)."""
  return platform_lib.choices(platform).cache_layout


def decode_weights(cfg: dec.ModelConfig, params) -> dict:
  """Per-layer matrices in the compute dtype, sliced and reshaped once per sampling call, not once per token:
  q, k and v as one [D, (N+2K)·H] matrix, QK-norm scales as one [N+K, H] array."""
  D, N, K, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dtype
  b = params["blocks"]
  layers = []
  for l in range(cfg.n_layers):
    lw = dict(qkv=jnp.concatenate([b[n][l].reshape(D, -1) for n in ("q_proj", "k_proj", "v_proj")], 1).astype(dt),
              out=b["o_proj"][l].reshape(-1, D).astype(dt), up=b["up_proj"][l].astype(dt),
              down=b["down_proj"][l].astype(dt))
    if cfg.mlp == "swiglu":
      lw["gate"] = b["gate_proj"][l].astype(dt)
    if cfg.qkv_bias:
      lw["qkv_bias"] = jnp.concatenate([b[n][l].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")]).astype(dt)
    if cfg.norm_scale:
      lw.update(attn_norm=b["input_layernorm"][l], mlp_norm=b["post_attention_layernorm"][l])
      if cfg.qk_norm:
        lw["qk_norm"] = jnp.concatenate([jnp.broadcast_to(b["q_norm"][l], (N, cfg.head_dim)),
                                         jnp.broadcast_to(b["k_norm"][l], (K, cfg.head_dim))])
    layers.append(lw)
  unembed = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  return dict(embed=params["embed"], unembed=unembed.astype(dt), norm=params.get("norm"), layers=layers)


def rope_table(cfg: dec.ModelConfig, length: int):
  """sin, cos [length, H/2] of every position, computed once per sampling call: computed inside the decode
  step, XLA fuses them into every use and evaluates them per element."""
  angle_Sh = jnp.arange(length, dtype=jnp.float32)[:, None] * dec.inv_frequencies(cfg)
  return jnp.sin(angle_Sh), jnp.cos(angle_Sh)


def heads_minor_cache(cfg: dec.ModelConfig, prefill: dict, batch_size: int, length: int, constrain) -> dict:
  """The [S, H, B·N] decode cache of every layer, holding the prefill's [L, B, P, K, H] keys and values."""
  B, H, G = batch_size, cfg.head_dim, cfg.n_groups
  cache = {}
  for name in ("k", "v"):
    empty = constrain(jnp.zeros((length, H, B * cfg.n_heads), cfg.dtype), 2)
    kv_LBPNH = jnp.repeat(prefill[name], G, axis=3) if G > 1 else prefill[name]
    P = kv_LBPNH.shape[2]
    prefix = [x.transpose(1, 3, 0, 2).reshape(P, H, B * cfg.n_heads).astype(cfg.dtype) for x in kv_LBPNH]
    cache[name] = [jax.lax.dynamic_update_slice(empty, x, (0, 0, 0)) for x in prefix]
  return cache


def _attend(q_BNH, k_BNH, v_BNH, kc_SHX, vc_SHX, mask_S, span: int, dt):
  """Attention of one query per (row, head) to the cached entries before pos and to the token's own key/value."""
  B, N, H = q_BNH.shape
  q32_HX = q_BNH.astype(jnp.float32).reshape(B * N, H).T * (H ** -0.5)  # X = B·N, the minor dimension
  k_HX, v_HX = k_BNH.reshape(B * N, H).T, v_BNH.reshape(B * N, H).T
  old_SX = jnp.where(mask_S, jnp.sum(q32_HX * kc_SHX[:span].astype(jnp.float32), axis=1), -jnp.inf)
  new_X = jnp.sum(q32_HX * k_HX.astype(jnp.float32), axis=0)
  top_X = jnp.maximum(jnp.max(old_SX, axis=0), new_X)
  e_old_SX, e_new_X = jnp.exp(old_SX - top_X), jnp.exp(new_X - top_X)
  attn_HX = (jnp.sum(e_old_SX[:, None] * vc_SHX[:span].astype(jnp.float32), axis=0)
             + e_new_X * v_HX.astype(jnp.float32))
  attn_BNH = (attn_HX / (jnp.sum(e_old_SX, axis=0) + e_new_X)).T.reshape(B, N, H).astype(dt)
  return attn_BNH, k_HX, v_HX


def _write_after_reads(cache_SHX, x_HX, attn_BNH, pos):
  """XLA updates a loop-carried buffer in place only if the value written provably comes after every read of
  the old buffer: a zero that depends on the attention output (x·0 is not folded for floats) says so, and the
  caller's barrier keeps the attention from being fused into the update (which would read the old buffer)."""
  after_reads = 0.0 * attn_BNH[:1, :1, 0].astype(cache_SHX.dtype)
  return jax.lax.dynamic_update_slice(cache_SHX, (x_HX.astype(cache_SHX.dtype) + after_reads)[None], (pos, 0, 0))


def heads_minor_step(cfg: dec.ModelConfig, w: dict, cache: dict, token_B, pos, span: int, rope_sin_cos):
  """Logits [B, V] for one new token per row at position `pos`, and the cache with its key/value written.

  The decoder's computation for a single query, on the [S, H, B·N] layout; `span` is a static bound ≥ pos on
  the cache entries read.
  """
  N, K, G, H, eps, dt = cfg.n_heads, cfg.n_kv_heads, cfg.n_groups, cfg.head_dim, cfg.norm_eps, cfg.dtype
  B = token_B.shape[0]
  x_BD = jnp.take(w["embed"], token_B, axis=0).astype(dt)
  mask_S = (jnp.arange(span) < pos)[:, None]  # entries written by earlier tokens
  # Every row is at the same position: one rotation for all rows, heads and layers.
  sin_h, cos_h = (jax.lax.dynamic_index_in_dim(t, pos, keepdims=False) for t in rope_sin_cos)
  new_k, new_v = [], []
  for l, lw in enumerate(w["layers"]):
    h_BD = dec.rms_norm(x_BD, eps, lw.get("attn_norm"))
    qkv_BY = h_BD @ lw["qkv"]
    if "qkv_bias" in lw:
      qkv_BY = qkv_BY + lw["qkv_bias"]
    qk_BMH = qkv_BY[:, :(N + K) * H].reshape(B, N + K, H)  # q and k heads together: one norm, one rotation
    if cfg.qk_norm:
      qk_BMH = dec.rms_norm(qk_BMH, eps, lw.get("qk_norm"))
    qk_BMH = dec.rotate(qk_BMH, sin_h, cos_h)
    q_BNH, k_BNH = qk_BMH[:, :N], qk_BMH[:, N:]
    v_BNH = qkv_BY[:, (N + K) * H:].reshape(B, K, H)
    if G > 1:  # the cache holds a key and value per query head
      k_BNH, v_BNH = jnp.repeat(k_BNH, G, axis=1), jnp.repeat(v_BNH, G, axis=1)
    attn_BNH, k_HX, v_HX = _attend(q_BNH, k_BNH, v_BNH, cache["k"][l], cache["v"][l], mask_S, span, dt)
    attn_BNH, k_HX, v_HX = jax.lax.optimization_barrier((attn_BNH, k_HX, v_HX))
    new_k.append(_write_after_reads(cache["k"][l], k_HX, attn_BNH, pos))
    new_v.append(_write_after_reads(cache["v"][l], v_HX, attn_BNH, pos))
    x_BD = x_BD + attn_BNH.reshape(B, N * H) @ lw["out"]
    h_BD = dec.rms_norm(x_BD, eps, lw.get("mlp_norm"))
    x_BD = x_BD + dec.activation(cfg, h_BD, lw["up"], lw.get("gate")) @ lw["down"]
  h_BD = dec.rms_norm(x_BD, eps, w["norm"])
  logits_BV = jnp.dot(h_BD, w["unembed"], preferred_element_type=jnp.float32)
  return logits_BV, dict(k=new_k, v=new_v)


def make_step(cfg: dec.ModelConfig, layout: str, params, prefill: dict, batch_size: int, length: int, constrain):
  """(cache, step): the decode cache holding the prefill's entries, and step(cache, token_B, pos, span) ->
  (logits [B, V] of the token at `pos`, cache with it written) on `layout`."""
  if layout == "heads_minor":
    w, table = decode_weights(cfg, params), rope_table(cfg, length)
    cache = heads_minor_cache(cfg, prefill, batch_size, length, constrain)
    return cache, lambda c, token_B, pos, span: heads_minor_step(cfg, w, c, token_B, pos, span, table)
  pad = [(0, 0), (0, 0), (0, length - prefill["k"].shape[2]), (0, 0), (0, 0)]
  cache = {name: constrain(jnp.pad(x, pad), 1) for name, x in prefill.items()}

  def step(c, token_B, pos, span):
    logits_B1V, c = dec.apply(cfg, params, token_B[:, None], cache=c, cache_index=pos)
    return logits_B1V[:, 0], c

  return cache, step
