"""Llama-family decoder (Llama 3.x, Qwen2/2.5, Qwen3) in Flax linen, for finetuning pretrained instruct models.

The same calling convention as `model.py`: `apply(cfg, params, tokens, positions=, segments=, cache=,
cache_index=)` → (fp32 logits, cache), layers stacked [L, ...] with `nn.scan`. What differs from the paper's
small model: grouped-query attention (K key/value heads shared by N/K query heads each), RMSNorm with a
learned scale (Llama: eps 1e-5), a SwiGLU MLP, RoPE with Llama-3 frequency scaling, optional biases on
q/k/v (Qwen2) and per-head QK-norm with a learned scale (Qwen3), tied or untied embeddings.

`segments_BT` (optional, training only) restricts attention to tokens of the same packed example, and the
positions then restart at 0 in each example; segment 0 marks padding.

Parameter names follow Hugging Face's (q_proj, ..., down_proj) so that `hf_import` maps them one to one and
`sharding` can key its partition rules on them. Shape suffixes: B batch, T query length, S key length,
D width, N query heads, K key/value heads, G = N/K, H head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import model as model_lib


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_mlp: int
  norm_eps: float = 1e-5
  rope_theta: float = 500_000.0
  # Llama-3 scaling as (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings); None = plain.
  rope_llama3: tuple | None = None
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  seq_len: int = 512  # training length (and the default sampling length)
  bos_id: int = -1
  eos_ids: tuple = ()
  pad_id: int = 0
  family: str = "llama"
  dtype: Any = jnp.float32  # compute dtype; parameters stay fp32
  remat: bool = False
  scan_unroll: int = 1

  @property
  def n_groups(self) -> int:
    return self.n_heads // self.n_kv_heads


def param_count(cfg: LlamaConfig) -> int:
  D, H, L = cfg.d_model, cfg.head_dim, cfg.n_layers
  attn = D * H * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  attn += H * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.qkv_bias else 0
  per_layer = attn + 3 * D * cfg.d_mlp + 2 * D + (2 * H if cfg.qk_norm else 0)
  return L * per_layer + D + cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: LlamaConfig, seq_len: int | None = None) -> float:
  T = seq_len or cfg.seq_len
  matmul = param_count(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  return 6.0 * matmul + 12.0 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim


def inv_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies [H/2] in float32, with Llama-3's long-context rescaling when configured."""
  H = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))).astype(np.float32)
  if cfg.rope_llama3 is None:
    return inv
  factor, low, high, old_len = cfg.rope_llama3
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x_BTNH, positions_BT, inv_freq_h):
  """Rotary embedding on the two halves of the head dimension (Hugging Face's rotate_half convention)."""
  angle_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h)
  cos = jnp.cos(angle_BTh)[:, :, None, :]
  sin = jnp.sin(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def rms_norm(x, scale, eps: float):
  """Normalise in fp32, cast back, then multiply by the learned scale (as Hugging Face's LlamaRMSNorm)."""
  x32 = x.astype(jnp.float32)
  y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  return scale.astype(x.dtype) * y


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, layer_cache, positions_BT, segments_BT, cache_index):
    cfg = self.cfg
    D, N, K, G, H, F, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_groups, cfg.head_dim, cfg.d_mlp, cfg.dtype
    std = 0.02
    p = lambda name, shape, init=_normal(std): self.param(name, init, shape, jnp.float32)
    w_q, w_k, w_v = p("q_proj", (D, N, H)), p("k_proj", (D, K, H)), p("v_proj", (D, K, H))
    w_o = p("o_proj", (N, H, D))
    w_gate, w_up, w_down = p("gate_proj", (D, F)), p("up_proj", (D, F)), p("down_proj", (F, D))
    attn_norm = p("input_layernorm", (D,), nn.initializers.ones)
    mlp_norm = p("post_attention_layernorm", (D,), nn.initializers.ones)
    B, T = x_BTD.shape[:2]

    h_XD = rms_norm(x_BTD, attn_norm, cfg.norm_eps).reshape(B * T, D)
    q_BTNH = jnp.einsum("xd,dnh->xnh", h_XD, w_q.astype(dt)).reshape(B, T, N, H)
    k_BTKH = jnp.einsum("xd,dkh->xkh", h_XD, w_k.astype(dt)).reshape(B, T, K, H)
    v_BTKH = jnp.einsum("xd,dkh->xkh", h_XD, w_v.astype(dt)).reshape(B, T, K, H)
    if cfg.qkv_bias:
      z = nn.initializers.zeros
      q_BTNH = q_BTNH + p("q_bias", (N, H), z).astype(dt)
      k_BTKH = k_BTKH + p("k_bias", (K, H), z).astype(dt)
      v_BTKH = v_BTKH + p("v_bias", (K, H), z).astype(dt)
    if cfg.qk_norm:
      q_BTNH = rms_norm(q_BTNH, p("q_norm", (H,), nn.initializers.ones), cfg.norm_eps)
      k_BTKH = rms_norm(k_BTKH, p("k_norm", (H,), nn.initializers.ones), cfg.norm_eps)
    inv_freq = inv_frequencies(cfg)
    q_BTNH = rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = rope(k_BTKH, positions_BT, inv_freq)

    if layer_cache is None:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
      mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
      if segments_BT is not None:
        mask_BTS = mask_BTS & (segments_BT[:, None, :] == segments_BT[:, :, None])
      new_cache = None
    else:
      new_cache = model_lib.write_cache(layer_cache, k_BTKH, v_BTKH, cache_index)
      k_BSKH, v_BSKH = new_cache["k"], new_cache["v"]
      S = k_BSKH.shape[1]
      # Cache slot s holds the token at position s; a query sees the slots written at or before its own.
      slot_BTS = jnp.arange(S)[None, None, :]
      query_slot_BT = jnp.arange(T)[None, :] + cache_index
      mask_BTS = jnp.broadcast_to(slot_BTS <= query_slot_BT[:, :, None], (B, T, S))
      k_BSKH, v_BSKH = k_BSKH.astype(dt), v_BSKH.astype(dt)

    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS * (H ** -0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dt)
    attn_XNH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH).reshape(B * T, N, H)
    x_XD = x_BTD.reshape(B * T, D) + jnp.einsum("xnh,nhd->xd", attn_XNH, w_o.astype(dt))

    h_XD = rms_norm(x_XD, mlp_norm, cfg.norm_eps)
    h_XF = jax.nn.silu(h_XD @ w_gate.astype(dt)) * (h_XD @ w_up.astype(dt))
    x_BTD = (x_XD + h_XF @ w_down.astype(dt)).reshape(B, T, D)
    return x_BTD, new_cache


class Llama(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segments_BT=None, cache=None, cache_index=0):
    """Returns (fp32 logits [B, T, V], updated cache or None); see the module docstring."""
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T) + cache_index, (B, T))
    embed_VD = self.param("embed", _normal(0.02), (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                     unroll=cfg.scan_unroll)(cfg, name="blocks")
    x_BTD, new_cache = blocks(x_BTD, cache, positions_BT, segments_BT, cache_index)
    final_norm = self.param("norm", nn.initializers.ones, (cfg.d_model,), jnp.float32)
    h_XD = rms_norm(x_BTD, final_norm, cfg.norm_eps).reshape(B * T, cfg.d_model)
    if cfg.tie_embeddings:
      logits_XV = jnp.einsum("xd,vd->xv", h_XD, embed_VD.astype(cfg.dtype), preferred_element_type=jnp.float32)
    else:
      unembed_DV = self.param("unembed", _normal(0.02), (cfg.d_model, cfg.vocab_size), jnp.float32)
      logits_XV = jnp.dot(h_XD, unembed_DV.astype(cfg.dtype), preferred_element_type=jnp.float32)
    return logits_XV.reshape(B, T, cfg.vocab_size), new_cache


def init_params(cfg: LlamaConfig, key) -> dict:
  return Llama(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_cache(cfg: LlamaConfig, batch_size: int, length: int | None = None, dtype=None) -> dict:
  """An empty KV cache: k and v of shape [L, B, S, K, H] (K key/value heads, not N)."""
  shape = (cfg.n_layers, batch_size, length or cfg.seq_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def apply(cfg: LlamaConfig, params, tokens_BT, **kwargs):
  return Llama(cfg).apply({"params": params}, tokens_BT, **kwargs)


def logits(cfg: LlamaConfig, params, tokens_BT, segments_BT=None, positions_BT=None):
  """Training forward pass: fp32 logits [B, T, V]."""
  return apply(cfg, params, tokens_BT, positions_BT=positions_BT, segments_BT=segments_BT)[0]


def segment_positions(segments_BT):
  """Positions that restart at 0 at every change of segment id along a row (packed examples)."""
  T = segments_BT.shape[1]
  idx_BT = jnp.broadcast_to(jnp.arange(T), segments_BT.shape)
  start_BT = jnp.concatenate([jnp.ones_like(segments_BT[:, :1], bool), segments_BT[:, 1:] != segments_BT[:, :-1]], 1)
  first_BT = jax.lax.cummax(jnp.where(start_BT, idx_BT, 0), axis=1)
  return idx_BT - first_BT



@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = the whole vocabulary
  eos_id: int = -1  # -1 = never stop; otherwise rows that emitted it emit pad_id afterwards
  pad_id: int = 0


def _draw(key, logits_BV, s: Sampling):
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / s.temperature
  if 0 < s.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def make_generator(cfg: LlamaConfig, s: Sampling, batch_size: int, prompt_len: int, length: int, mesh=None):
  """A jitted fn(params, prompt_BP, key) -> tokens [B, length]: the prompt, then sampled continuations.

  The prompt is prefilled in one pass, then a fori_loop decodes one token per row per step through the KV
  cache. Position t is drawn with fold_in(key, t), so a row's samples depend only on the key and the batch.
  """
  from jaxreplay import sharding
  B, Pl, T = batch_size, prompt_len, length
  if not 1 <= Pl <= T:
    raise ValueError(f"The prompt length {Pl} must lie in [1, length={T}]: give at least a BOS token.")
  if mesh is not None and B % sharding.batch_divisor(mesh):
    raise ValueError(f"The sampling batch of {B} rows is not divisible by the {sharding.batch_divisor(mesh)} "
                     "data-parallel devices: choose a multiple of mesh.data × mesh.fsdp.")
  if s.temperature < 0:
    raise ValueError(f"temperature={s.temperature} must be ≥ 0 (0 = greedy).")
  stop = s.eos_id >= 0

  def run(params, prompt_BP, key):
    prompt_BP = prompt_BP.astype(jnp.int32)
    tokens_BT = jax.lax.dynamic_update_slice(jnp.full((B, T), s.pad_id, jnp.int32), prompt_BP, (0, 0))
    if Pl == T:
      return tokens_BT
    logits_BPV, cache = apply(cfg, params, prompt_BP, cache=init_cache(cfg, B, T), cache_index=0)
    token_B = _draw(jax.random.fold_in(key, Pl), logits_BPV[:, -1], s)
    tokens_BT = tokens_BT.at[:, Pl].set(token_B)
    done_B = (token_B == s.eos_id) if stop else jnp.zeros((B,), bool)

    def body(pos, carry):
      tokens_BT, cache, token_B, done_B = carry
      logits_B1V, cache = apply(cfg, params, token_B[:, None], cache=cache, cache_index=pos - 1)
      new_B = _draw(jax.random.fold_in(key, pos), logits_B1V[:, 0], s)
      if stop:
        new_B = jnp.where(done_B, s.pad_id, new_B)
        done_B = done_B | (new_B == s.eos_id)
      tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, new_B[:, None], (0, pos))
      return tokens_BT, cache, new_B, done_B

    return jax.lax.fori_loop(Pl + 1, T, body, (tokens_BT, cache, token_B, done_B))[0]

  out_sh = sharding.batch_sharding(mesh) if mesh is not None else None
  return jax.jit(run, out_shardings=out_sh)


_GENERATORS: dict = {}


def generate(cfg: LlamaConfig, params, prompt_BP, key, length: int | None = None, s: Sampling = Sampling(),
             mesh=None):
  """Rows of `length` tokens (default cfg.seq_len) continuing `prompt_BP` (one prompt length for all rows).

  With a mesh, a host (numpy) prompt holds this process's rows and the result is the global array."""
  from jaxreplay import sharding
  if mesh is not None and not isinstance(prompt_BP, jax.Array):  # host rows: this process's share
    prompt_BP = sharding.put_batch(np.asarray(prompt_BP, np.int32), mesh)
  B, Pl = prompt_BP.shape
  args = (cfg, s, B, Pl, length or cfg.seq_len, mesh)
  if args not in _GENERATORS:
    _GENERATORS[args] = make_generator(*args)
  return _GENERATORS[args](params, jnp.asarray(prompt_BP), key)
