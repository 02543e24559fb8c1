"""LoRA baseline: a rank-r update on every non-embedding matrix; the pretrained weights stay frozen.

Each block weight is treated per layer as a matrix fan_in × fan_out (qkv: D × 3·N·H, out: N·H × D, up: D × F,
down: F × D). Its update is scale · A @ B with A [L, fan_in, r] ~ N(0, fan_in^-1/2), B [L, r, fan_out] = 0,
so the merged model equals the pretrained one at initialisation; scale = alpha / r (alpha 0 means alpha = r).
Adapter leaves are named `lora_a`/`lora_b`, which the sharding rules replicate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MATRICES = ("qkv", "out", "up", "down")


def _fans(name: str, shape) -> tuple[int, int]:
  """(fan_in, fan_out) of one layer's matrix, from the stacked weight's shape [L, ...]."""
  if name == "qkv":  # [L, D, 3, N, H]
    return shape[1], math.prod(shape[2:])
  if name == "out":  # [L, N, H, D]
    return math.prod(shape[1:-1]), shape[-1]
  return shape[1], shape[2]  # up [L, D, F], down [L, F, D]


def scale(lora_cfg) -> float:
  rank = int(lora_cfg.rank)
  alpha = float(lora_cfg.alpha) or float(rank)
  return alpha / rank


def init_adapters(params, rank: int, key) -> dict:
  """Adapters for the blocks of `params` (only their shapes are used)."""
  blocks = params["blocks"]
  adapters = {}
  for i, name in enumerate(MATRICES):
    if name not in blocks:
      continue
    w = blocks[name]
    L = w.shape[0]
    fan_in, fan_out = _fans(name, w.shape)
    a = jax.random.normal(jax.random.fold_in(key, i), (L, fan_in, rank), jnp.float32) * fan_in ** -0.5
    adapters[name] = dict(lora_a=a, lora_b=jnp.zeros((L, rank, fan_out), jnp.float32))
  return dict(blocks=adapters)


def merge(adapters, frozen, scale_: float = 1.0):
  """Full parameters: the frozen weights (never differentiated) plus scale · A @ B on every block matrix."""
  frozen = jax.lax.stop_gradient(frozen)
  blocks = dict(frozen["blocks"])
  for name, ab in adapters["blocks"].items():
    w = blocks[name]
    delta = jnp.einsum("lir,lro->lio", ab["lora_a"], ab["lora_b"]) * scale_
    blocks[name] = w + delta.reshape(w.shape).astype(w.dtype)
  return dict(frozen, blocks=blocks)


def parameterization(lora_cfg, key):
  """(trainable_fn, merge_fn) for `steps`/`train`: the adapters are what the optimizer sees."""
  rank = int(lora_cfg.rank)
  if rank <= 0:
    from jaxreplay.config import ConfigError
    raise ConfigError(f"config.lora.rank={rank}: LoRA needs a rank ≥ 1 (0 means full finetuning).")
  s = scale(lora_cfg)

  def trainable_fn(params):
    return init_adapters(params, rank, key)

  def merge_fn(adapters, frozen):
    return merge(adapters, frozen, s)

  return trainable_fn, merge_fn


def count(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))


def expected_count(model_cfg, rank: int) -> int:
  """r · Σ (fan_in + fan_out) over the four matrices of every layer."""
  D, NH, F = model_cfg.d_model, model_cfg.n_heads * model_cfg.head_dim, model_cfg.d_mlp
  return model_cfg.n_layers * rank * ((D + 3 * NH) + (NH + D) + (D + F) + (F + D))
