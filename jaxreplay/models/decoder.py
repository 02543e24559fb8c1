"""The one decoder (Flax linen): the paper's transformer and the Llama-3.x / Qwen2 / Qwen3 families.

Pre-norm blocks: RMSNorm (with or without a learned scale), attention with grouped key/value heads, optional
q/k/v biases and QK-norm, RoPE (optionally with Llama-3 frequency scaling), and a GELU or SwiGLU MLP; tied or
untied embeddings. The paper's model is the default config; `hf_import.config_from_hf` sets the rest.
Layers are stacked with `nn.scan` so compile time does not grow with depth. Parameters are fp32; matmuls run
in the compute dtype; softmax and logits are fp32. Parameter names follow Hugging Face's (q_proj, ...,
down_proj), so that `hf_import` maps them one to one and `sharding` keys its partition rules on them.

`segments_BT` (optional, training only) restricts attention to tokens of the same packed example; segment 0
marks padding. Shape suffixes: B batch, T query length, S key length, D width, N query heads, K key/value
heads, G = N/K, H head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreplay import platform as platform_lib

PARAMS_FORMAT = 2  # 1: the paper model's fused qkv/out/up/down leaves (before the decoders became one)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 256
  n_layers: int = 6
  head_dim: int = 64
  seq_len: int = 256  # training length (and the default sampling length)
  vocab_size: int = 4096
  n_heads: int = 0  # 0 = d_model // head_dim
  n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
  d_mlp: int = 0  # 0 = mlp_ratio · d_model
  mlp_ratio: int = 4
  mlp: str = "gelu"  # gelu (up, down) | swiglu (gate, up, down)
  norm_scale: bool = False  # RMSNorm with a learned scale (Llama/Qwen) or without (the paper)
  norm_eps: float = 1e-6
  qk_norm: bool = True
  qkv_bias: bool = False
  tie_embeddings: bool = False
  rope_base: float = 10_000.0
  # Llama-3 scaling as (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings); None = plain.
  rope_llama3: tuple | None = None
  bos_id: int = -1
  eos_ids: tuple = ()
  pad_id: int = 0
  family: str = "paper"
  dtype: Any = jnp.float32  # compute dtype
  remat: bool = False
  scan_unroll: int = 1  # layers per scan iteration; n_layers = a fully unrolled loop
  attention: str = "einsum"  # the kernel: einsum, xla or cudnn (the platform's choice in from_config)
  # q, k, v from one matmul with their kernels concatenated in the step (the parameters stay three): None = where
  # it fits (K = N, no bias); False = three projections (the general path, which tests compare it against).
  fuse_qkv: bool | None = None

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("n_heads", self.n_heads or self.d_model // self.head_dim)
    set_("n_kv_heads", self.n_kv_heads or self.n_heads)
    set_("d_mlp", self.d_mlp or self.mlp_ratio * self.d_model)
    if self.fuse_qkv and not self._qkv_fits:
      raise ValueError("fuse_qkv=True needs n_kv_heads == n_heads and no qkv bias; leave it None (where it fits).")

  @property
  def _qkv_fits(self) -> bool:
    return self.n_kv_heads == self.n_heads and not self.qkv_bias

  @property
  def qkv_fused(self) -> bool:
    """Whether the block computes q, k, v in one matmul (`fuse_qkv`, None: where it fits)."""
    return self._qkv_fits if self.fuse_qkv is None else self.fuse_qkv

  @property
  def n_groups(self) -> int:
    return self.n_heads // self.n_kv_heads

  @classmethod
  def from_config(cls, m, dtype: str = "float32", platform: str = "cpu") -> "ModelConfig":
    """The paper's model from the config's `model` section, computing as `platform.choices` says."""
    choice = platform_lib.choices(platform)
    unroll = m.get("scan_unroll", 0)
    unroll = unroll if unroll > 0 else choice.scan_unroll(m.n_layers)  # ≤ 0: auto, the platform's
    return cls(d_model=m.d_model, n_layers=m.n_layers, head_dim=m.head_dim, seq_len=m.seq_len,
               vocab_size=m.vocab_size, mlp_ratio=m.mlp_ratio, rope_base=float(m.rope_base),
               norm_eps=float(m.norm_eps), dtype=jnp.dtype(dtype), remat=bool(m.remat) or choice.remat,
               scan_unroll=min(int(unroll), m.n_layers), attention=choice.attention)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """The paper's convention counts one embedding matrix; the true count has both (one when they are tied)."""
  L, D, V, H, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.d_mlp
  N, K = cfg.n_heads, cfg.n_kv_heads
  per_layer = D * H * (2 * N + 2 * K) + (3 if cfg.mlp == "swiglu" else 2) * D * F  # = 12·D² for the paper's
  per_layer += H * (N + 2 * K) if cfg.qkv_bias else 0
  per_layer += (2 * D + (2 * H if cfg.qk_norm else 0)) if cfg.norm_scale else 0
  non_embedding = L * per_layer + (D if cfg.norm_scale else 0)
  return dict(non_embedding=non_embedding, paper=non_embedding + D * V,
              true=non_embedding + D * V * (1 if cfg.tie_embeddings else 2))


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token (forward + backward): 6·(matmul params) + 12·L·T·N·H for attention (PaLM)."""
  return 6.0 * param_counts(cfg)["paper"] + 12.0 * cfg.n_layers * cfg.seq_len * cfg.n_heads * cfg.head_dim


def rms_norm(x, eps: float, scale=None):
  """Normalise in fp32, cast back, then multiply by the learned scale if any (as Hugging Face's LlamaRMSNorm)."""
  x32 = x.astype(jnp.float32)
  y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  return y if scale is None else scale.astype(x.dtype) * y


def inv_frequencies(cfg: ModelConfig):
  """RoPE inverse frequencies [H/2] in float32, with Llama-3's long-context rescaling when configured."""
  H = cfg.head_dim
  inv = cfg.rope_base ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)
  if cfg.rope_llama3 is None:
    return inv
  factor, low, high, old_len = cfg.rope_llama3
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def rotate(x, sin, cos):
  """RoPE on the two halves of the head dimension (Hugging Face's rotate_half), given broadcastable sin, cos."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope(x_BTNH, positions_BT, inv_freq_h):
  angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
  return rotate(x_BTNH, jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :])


def activation(cfg: ModelConfig, h_XD, w_up, w_gate=None):
  if cfg.mlp == "swiglu":
    return jax.nn.silu(h_XD @ w_gate) * (h_XD @ w_up)
  return jax.nn.gelu(h_XD @ w_up)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def attention(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal: bool):
  """softmax(q·kᵀ/√H where mask)·v: [B, T, N, H] in the compute dtype, logits and softmax in fp32, with the
  kernel `cfg.attention` names. `causal`: the mask is the plain causal one (cuDNN's fused kernel needs that)."""
  B, T, N, H = q_BTNH.shape
  K, dt = k_BSKH.shape[2], cfg.dtype
  if cfg.attention == "einsum":
    # Without grouped heads (G = 1) no group axis: with one, XLA:CPU splits the softmax's fusions and passes over
    # the [B, N, T, S] logits twice more per layer (measured, docs/performance.md).
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H) if N != K else q_BTNH
    spec = "btkgh,bskh->bkgts" if N != K else "btkh,bskh->bkts"
    logits_BKGTS = jnp.einsum(spec, q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * (H ** -0.5)
    mask = mask_BTS[:, None, None] if N != K else mask_BTS[:, None]
    logits_BKGTS = jnp.where(mask, logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dt)
    out_spec = "bkgts,bskh->btkgh" if N != K else "bkts,bskh->btkh"
    return jnp.einsum(out_spec, probs_BKGTS, v_BSKH).reshape(B, T, N, H)
  if causal:
    impl = "cudnn" if cfg.attention == "cudnn" and platform_lib.cudnn_applies(dt, H) else "xla"
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation=impl)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="xla")


class Block(nn.Module):
  cfg: ModelConfig
  default_positions: bool = False  # positions 0..T-1 (+ cache index) on every row

  def norm(self, name: str, x, dim: int):
    cfg = self.cfg
    scale = self.param(name, nn.initializers.ones, (dim,), jnp.float32) if cfg.norm_scale else None
    return rms_norm(x, cfg.norm_eps, scale)

  def matrices(self):
    """The block's weight matrices (q, k, v, o, gate or None, up, down), declared as parameters."""
    cfg = self.cfg
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    if cfg.family == "paper" and cfg.mlp == "gelu" and K == N:
      return self.paper_matrices()
    p = lambda name, shape, std=D ** -0.5: self.param(name, _normal(std), shape, jnp.float32)
    w_gate = p("gate_proj", (D, F)) if cfg.mlp == "swiglu" else None
    w_q, w_k, w_v, w_o = p("q_proj", (D, N, H)), p("k_proj", (D, K, H)), p("v_proj", (D, K, H)), p("o_proj", (N, H, D))
    return w_q, w_k, w_v, w_o, w_gate, p("up_proj", (D, F)), p("down_proj", (F, D), F ** -0.5)

  def paper_matrices(self):
    """The paper model's matrices, initialised with what its fused-qkv code drew (format 1): one [D, 3, N, H]
    matrix split into q, k, v, then out, up, down, each from the next of the layer's keys (flax numbers the
    keys by call), so that a fresh model and the quickstart's numbers did not change when the decoders became
    one. `tests/test_decoder.py` rebuilds the old draw."""
    cfg = self.cfg
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp
    drawn = {}
    if self.is_initializing():
      k_qkv, k_out, k_up, k_down = (self.make_rng("params") for _ in range(4))
      qkv = _normal(D ** -0.5)(k_qkv, (D, 3, N, H), jnp.float32)
      drawn = dict(q_proj=qkv[:, 0], k_proj=qkv[:, 1], v_proj=qkv[:, 2],
                   o_proj=_normal(D ** -0.5)(k_out, (N, H, D), jnp.float32),
                   up_proj=_normal(D ** -0.5)(k_up, (D, F), jnp.float32),
                   down_proj=_normal(F ** -0.5)(k_down, (F, D), jnp.float32))
    w = {name: self.variable("params", name, lambda name=name: drawn[name]).value
         for name in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
    return w["q_proj"], w["k_proj"], w["v_proj"], w["o_proj"], None, w["up_proj"], w["down_proj"]

  @nn.compact
  def __call__(self, x_BTD, layer_cache, positions_BT, segments_BT, cache_index):
    cfg = self.cfg
    D, N, K, H, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dtype
    w_q, w_k, w_v, w_o, w_gate, w_up, w_down = self.matrices()
    B, T = x_BTD.shape[:2]

    # Projections on [B·T, D] rows: XLA:CPU runs a 2-D matmul faster than the same contraction in 3-D.
    h_XD = self.norm("input_layernorm", x_BTD, D).reshape(B * T, D)
    if cfg.qkv_fused:  # one [B·T, D] × [D, 3·N·H] matmul (and one for each gradient) instead of three narrow ones
      w_DCNH = jnp.stack([w_q, w_k, w_v], axis=1).astype(dt)
      qkv_BTCNH = jnp.einsum("xd,dcnh->xcnh", h_XD, w_DCNH).reshape(B, T, 3, N, H)
      q_BTNH, k_BTKH, v_BTKH = qkv_BTCNH[:, :, 0], qkv_BTCNH[:, :, 1], qkv_BTCNH[:, :, 2]
    else:
      q_BTNH = jnp.einsum("xd,dnh->xnh", h_XD, w_q.astype(dt)).reshape(B, T, N, H)
      k_BTKH = jnp.einsum("xd,dkh->xkh", h_XD, w_k.astype(dt)).reshape(B, T, K, H)
      v_BTKH = jnp.einsum("xd,dkh->xkh", h_XD, w_v.astype(dt)).reshape(B, T, K, H)
    if cfg.qkv_bias:
      z = nn.initializers.zeros
      q_BTNH = q_BTNH + self.param("q_bias", z, (N, H), jnp.float32).astype(dt)
      k_BTKH = k_BTKH + self.param("k_bias", z, (K, H), jnp.float32).astype(dt)
      v_BTKH = v_BTKH + self.param("v_bias", z, (K, H), jnp.float32).astype(dt)
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.norm("q_norm", q_BTNH, H), self.norm("k_norm", k_BTKH, H)
    inv_freq = inv_frequencies(cfg)
    q_BTNH, k_BTKH = rope(q_BTNH, positions_BT, inv_freq), rope(k_BTKH, positions_BT, inv_freq)

    if layer_cache is None:
      k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None
      mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
      if segments_BT is not None:
        mask_BTS = mask_BTS & (segments_BT[:, None, :] == segments_BT[:, :, None])
    else:
      # Write this chunk at cache_index; cache slot s holds position s, and a query sees the slots up to its own.
      new_cache = {name: jax.lax.dynamic_update_slice_in_dim(layer_cache[name], x.astype(layer_cache[name].dtype),
                                                             cache_index, axis=1)
                   for name, x in (("k", k_BTKH), ("v", v_BTKH))}
      k_BSKH, v_BSKH = new_cache["k"].astype(dt), new_cache["v"].astype(dt)
      slot_S = jnp.arange(k_BSKH.shape[1])
      mask_BTS = jnp.broadcast_to(slot_S[None, None, :] <= positions_BT[:, :, None], (B, T, slot_S.shape[0]))

    causal = layer_cache is None and segments_BT is None and self.default_positions
    attn_XNH = attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal).reshape(B * T, N, H)
    x_XD = x_BTD.reshape(B * T, D) + jnp.einsum("xnh,nhd->xd", attn_XNH, w_o.astype(dt))

    h_XD = self.norm("post_attention_layernorm", x_XD, D)
    h_XF = activation(cfg, h_XD, w_up.astype(dt), None if w_gate is None else w_gate.astype(dt))
    x_BTD = (x_XD + h_XF @ w_down.astype(dt)).reshape(B, T, D)
    return x_BTD, new_cache


class Decoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segments_BT=None, cache=None, cache_index=0):
    """Returns (fp32 logits [B, T, V], updated cache or None).

    Without a cache this is the training forward pass. With a cache (from `init_cache`) the tokens are
    written at `cache_index` and attend to every earlier cache entry: prefill and one-token decode alike.
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    default_positions = positions_BT is None
    if default_positions:
      positions_BT = jnp.broadcast_to(jnp.arange(T) + cache_index, (B, T))
    embed_VD = self.param("embed", _normal(cfg.d_model ** -0.5), (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                     unroll=cfg.scan_unroll)(cfg, default_positions, name="blocks")
    x_BTD, new_cache = blocks(x_BTD, cache, positions_BT, segments_BT, cache_index)
    scale = self.param("norm", nn.initializers.ones, (cfg.d_model,), jnp.float32) if cfg.norm_scale else None
    h_XD = rms_norm(x_BTD, cfg.norm_eps, scale).reshape(B * T, cfg.d_model)
    if cfg.tie_embeddings:
      unembed_DV = embed_VD.T
    else:
      unembed_DV = self.param("unembed", _normal(cfg.d_model ** -0.5), (cfg.d_model, cfg.vocab_size), jnp.float32)
    logits_XV = jnp.dot(h_XD, unembed_DV.astype(cfg.dtype), preferred_element_type=jnp.float32)
    return logits_XV.reshape(B, T, cfg.vocab_size), new_cache


def init_params(cfg: ModelConfig, key) -> dict:
  return Decoder(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None) -> dict:
  """An empty KV cache: k and v of shape [L, B, S, K, H] (K key/value heads)."""
  shape = (cfg.n_layers, batch_size, length or cfg.seq_len, cfg.n_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype))


def apply(cfg: ModelConfig, params, tokens_BT, **kwargs):
  return Decoder(cfg).apply({"params": params}, tokens_BT, **kwargs)


def logits(cfg: ModelConfig, params, tokens_BT, segments_BT=None, positions_BT=None):
  """Training forward pass: fp32 logits [B, T, V]."""
  return apply(cfg, params, tokens_BT, positions_BT=positions_BT, segments_BT=segments_BT)[0]


def segment_positions(segments_BT):
  """Positions that restart at 0 at every change of segment id along a row (packed examples)."""
  T = segments_BT.shape[1]
  idx_BT = jnp.broadcast_to(jnp.arange(T), segments_BT.shape)
  start_BT = jnp.concatenate([jnp.ones_like(segments_BT[:, :1], bool), segments_BT[:, 1:] != segments_BT[:, :-1]], 1)
  first_BT = jax.lax.cummax(jnp.where(start_BT, idx_BT, 0), axis=1)
  return idx_BT - first_BT


def upgrade_params(params: dict) -> dict:
  """Format-1 parameters (the paper model's fused blocks {qkv [L, D, 3, N, H], out, up, down}) in this
  decoder's names; the same numbers, so an export written before the decoders became one still loads."""
  b = params["blocks"]
  blocks = dict(q_proj=b["qkv"][:, :, 0], k_proj=b["qkv"][:, :, 1], v_proj=b["qkv"][:, :, 2], o_proj=b["out"],
                up_proj=b["up"], down_proj=b["down"])
  return dict(embed=params["embed"], unembed=params["unembed"], blocks=blocks)
