"""The paper's decoder-only transformer (Flax linen), with a KV-cache decode path.

Pre-norm blocks with scale-free RMSNorm, QK-norm, RoPE, a GELU MLP of width 4·D, no biases and untied
embeddings. Layers are stacked with `nn.scan` so compile time does not grow with depth. Parameters are fp32;
matmuls run in the compute dtype; softmax and logits are fp32.

Shape suffixes: B batch, T query length, S cache length, D model width, N heads, H head dim, F MLP width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 256
  n_layers: int = 6
  head_dim: int = 64
  seq_len: int = 256
  vocab_size: int = 4096
  mlp_ratio: int = 4
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32  # compute dtype
  remat: bool = False
  scan_unroll: int = 1  # layers per scan iteration; n_layers = a fully unrolled loop

  @property
  def n_heads(self) -> int:
    return self.d_model // self.head_dim

  @property
  def d_mlp(self) -> int:
    return self.mlp_ratio * self.d_model

  @classmethod
  def from_config(cls, m, dtype: str = "float32", platform: str = "cpu") -> "ModelConfig":
    unroll = m.get("scan_unroll", 0)
    if unroll <= 0:  # auto: XLA:CPU runs a scanned backward pass ~15% slower than an unrolled one
      unroll = m.n_layers if platform == "cpu" else 1
    return cls(d_model=m.d_model, n_layers=m.n_layers, head_dim=m.head_dim, seq_len=m.seq_len,
               vocab_size=m.vocab_size, mlp_ratio=m.mlp_ratio, rope_base=float(m.rope_base),
               norm_eps=float(m.norm_eps), dtype=jnp.dtype(dtype), remat=bool(m.remat),
               scan_unroll=min(int(unroll), m.n_layers))


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """The paper's convention counts one embedding matrix; the true count has both."""
  L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
  non_embedding = L * (4 * D * D + 2 * D * cfg.d_mlp)  # = 12·L·D² at mlp_ratio 4
  return dict(non_embedding=non_embedding, paper=non_embedding + D * V, true=non_embedding + 2 * D * V)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
  """Training FLOPs per token (forward + backward): 6·(matmul params) + 12·L·T·D for attention (PaLM)."""
  T = seq_len or cfg.seq_len
  counts = param_counts(cfg)
  return 6.0 * (counts["non_embedding"] + cfg.d_model * cfg.vocab_size) + 12.0 * cfg.n_layers * T * cfg.d_model


def rms_norm(x, eps: float):
  """RMSNorm without a learnable scale, computed in fp32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def rope(x_BTNH, positions_BT, base: float):
  """Rotary position embedding on the two halves of the head dimension."""
  H = x_BTNH.shape[-1]
  freq = base ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)
  angle_BTh = positions_BT[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, layer_cache, positions_BT, cache_index):
    cfg = self.cfg
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp
    dt = cfg.dtype
    w_qkv = self.param("qkv", _normal(D ** -0.5), (D, 3, N, H), jnp.float32)
    w_out = self.param("out", _normal(D ** -0.5), (N, H, D), jnp.float32)
    w_up = self.param("up", _normal(D ** -0.5), (D, F), jnp.float32)
    w_down = self.param("down", _normal(F ** -0.5), (F, D), jnp.float32)

    B, T = x_BTD.shape[:2]
    # Projections on [B·T, D] rows: XLA:CPU runs a 2-D matmul faster than the same contraction in 3-D.
    h_XD = rms_norm(x_BTD, cfg.norm_eps).reshape(B * T, D)
    qkv_BT3NH = jnp.einsum("xd,dknh->xknh", h_XD, w_qkv.astype(dt)).reshape(B, T, 3, N, H)
    q_BTNH, k_BTNH, v_BTNH = qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1], qkv_BT3NH[:, :, 2]
    q_BTNH = rope(rms_norm(q_BTNH, cfg.norm_eps), positions_BT, cfg.rope_base)
    k_BTNH = rope(rms_norm(k_BTNH, cfg.norm_eps), positions_BT, cfg.rope_base)

    if layer_cache is None:
      k_BSNH, v_BSNH = k_BTNH, v_BTNH
      key_pos_BS = positions_BT
      new_cache = None
    else:
      # Write this chunk at cache_index; attend to everything written so far.
      new_cache = write_cache(layer_cache, k_BTNH, v_BTNH, cache_index)
      k_BSNH, v_BSNH = new_cache["k"], new_cache["v"]
      S = k_BSNH.shape[1]
      key_pos_BS = jnp.broadcast_to(jnp.arange(S), (x_BTD.shape[0], S))
      k_BSNH, v_BSNH = k_BSNH.astype(dt), v_BSNH.astype(dt)

    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    logits_BNTS = logits_BNTS * (H ** -0.5)
    mask_BTS = key_pos_BS[:, None, :] <= positions_BT[:, :, None]
    logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(dt)
    attn_XNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH).reshape(B * T, N, H)
    x_XD = x_BTD.reshape(B * T, D) + jnp.einsum("xnh,nhd->xd", attn_XNH, w_out.astype(dt))

    h_XD = rms_norm(x_XD, cfg.norm_eps)
    h_XF = jax.nn.gelu(h_XD @ w_up.astype(dt))
    x_BTD = (x_XD + h_XF @ w_down.astype(dt)).reshape(B, T, D)
    return x_BTD, new_cache


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, cache=None, cache_index=0):
    """Returns (fp32 logits [B, T, V], updated cache or None).

    Without a cache this is the training forward pass. With a cache (from `init_cache`) the tokens are
    written at `cache_index` and attend to every earlier cache entry: prefill and one-token decode alike.
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T) + cache_index, (B, T))
    embed_VD = self.param("embed", _normal(cfg.d_model ** -0.5), (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)

    block = Block
    if cfg.remat:
      block = nn.remat(Block, prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                     unroll=cfg.scan_unroll)(cfg, name="blocks")
    x_BTD, new_cache = blocks(x_BTD, cache, positions_BT, cache_index)

    unembed_DV = self.param("unembed", _normal(cfg.d_model ** -0.5), (cfg.d_model, cfg.vocab_size), jnp.float32)
    h_XD = rms_norm(x_BTD, cfg.norm_eps).reshape(B * T, cfg.d_model)
    logits_BTV = jnp.dot(h_XD, unembed_DV.astype(cfg.dtype),
                         preferred_element_type=jnp.float32).reshape(B, T, cfg.vocab_size)
    return logits_BTV, new_cache


def init_params(cfg: ModelConfig, key) -> dict:
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(key, tokens)["params"]


def write_cache(layer_cache: dict, k_BTNH, v_BTNH, cache_index) -> dict:
  """One layer's cache {k, v: [B, S, N, H]} with a chunk's keys and values written at slot `cache_index`."""
  return {name: jax.lax.dynamic_update_slice_in_dim(layer_cache[name], x.astype(layer_cache[name].dtype),
                                                    cache_index, axis=1)
          for name, x in (("k", k_BTNH), ("v", v_BTNH))}


def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None, dtype=None) -> dict:
  """An empty KV cache: k and v of shape [L, B, S, N, H]."""
  S = length or cfg.seq_len
  shape = (cfg.n_layers, batch_size, S, cfg.n_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def apply(cfg: ModelConfig, params, tokens_BT, **kwargs):
  return Transformer(cfg).apply({"params": params}, tokens_BT, **kwargs)


def logits(cfg: ModelConfig, params, tokens_BT):
  """Training forward pass: fp32 logits [B, T, V]."""
  return apply(cfg, params, tokens_BT)[0]
