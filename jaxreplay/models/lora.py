"""LoRA baseline: a rank-r update on every non-embedding matrix; the pretrained weights stay frozen.

Each group of block weights that reads the same input is treated per layer as one matrix fan_in × fan_out:
qkv (q_proj, k_proj, v_proj: D × (N+2K)·H), out (o_proj: N·H × D), up (gate_proj if any and up_proj: D × F
or 2F), down (down_proj: F × D). Its update is scale · A @ B with A [L, fan_in, r] ~ N(0, fan_in^-1/2),
B [L, r, fan_out] = 0, so the merged model equals the pretrained one at initialisation; scale = alpha / r
(alpha 0 means alpha = r). Adapter leaves are named `lora_a`/`lora_b`, which the sharding rules replicate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxreplay.errors import ConfigError

GROUPS = dict(qkv=("q_proj", "k_proj", "v_proj"), out=("o_proj",), up=("gate_proj", "up_proj"), down=("down_proj",))
_FAN_IN_DIMS = dict(qkv=1, out=2, up=1, down=1)  # dims of the unstacked weight that its input runs over


def _members(blocks, group: str) -> list[str]:
  return [name for name in GROUPS[group] if name in blocks]


def _fans(group: str, blocks) -> tuple[int, int]:
  """(fan_in, fan_out) of one layer's group matrix, from the stacked weights' shapes [L, ...]."""
  k = _FAN_IN_DIMS[group]
  shapes = [blocks[name].shape for name in _members(blocks, group)]
  return math.prod(shapes[0][1:1 + k]), sum(math.prod(s[1 + k:]) for s in shapes)


def scale(lora_cfg) -> float:
  rank = int(lora_cfg.rank)
  return (float(lora_cfg.alpha) or float(rank)) / rank


def init_adapters(params, rank: int, key) -> dict:
  """Adapters for the blocks of `params` (only their shapes are used)."""
  blocks = params["blocks"]
  adapters = {}
  for i, group in enumerate(GROUPS):
    L = blocks[GROUPS[group][-1]].shape[0]
    fan_in, fan_out = _fans(group, blocks)
    a = jax.random.normal(jax.random.fold_in(key, i), (L, fan_in, rank), jnp.float32) * fan_in ** -0.5
    adapters[group] = dict(lora_a=a, lora_b=jnp.zeros((L, rank, fan_out), jnp.float32))
  return dict(blocks=adapters)


def merge(adapters, frozen, scale_: float = 1.0):
  """Full parameters: the frozen weights (never differentiated) plus scale · A @ B on every block matrix."""
  frozen = jax.lax.stop_gradient(frozen)
  blocks = dict(frozen["blocks"])
  for group, ab in adapters["blocks"].items():
    delta = jnp.einsum("lir,lro->lio", ab["lora_a"], ab["lora_b"]) * scale_
    at = 0
    for name in _members(blocks, group):
      w = blocks[name]
      width = math.prod(w.shape[1 + _FAN_IN_DIMS[group]:])
      blocks[name] = w + delta[..., at:at + width].reshape(w.shape).astype(w.dtype)
      at += width
  return dict(frozen, blocks=blocks)


def parameterization(lora_cfg, key):
  """(trainable_fn, merge_fn) for `steps`/`train`: the adapters are what the optimizer sees."""
  rank = int(lora_cfg.rank)
  if rank <= 0:
    raise ConfigError(f"config.lora.rank={rank}: LoRA needs a rank ≥ 1 (0 means full finetuning).")
  s = scale(lora_cfg)
  return (lambda params: init_adapters(params, rank, key)), (lambda adapters, frozen: merge(adapters, frozen, s))


def count(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))


def expected_count(model_cfg, rank: int) -> int:
  """r · Σ (fan_in + fan_out) over the four matrix groups of every layer."""
  D, F = model_cfg.d_model, model_cfg.d_mlp
  NH, KH = model_cfg.n_heads * model_cfg.head_dim, model_cfg.n_kv_heads * model_cfg.head_dim
  up = F * (2 if model_cfg.mlp == "swiglu" else 1)
  return model_cfg.n_layers * rank * ((D + NH + 2 * KH) + (NH + D) + (D + up) + (F + D))
