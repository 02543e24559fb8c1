"""Every speed choice that depends on the platform (cpu, gpu, tpu), made here and nowhere else.

`choices(platform)` says, for one platform:
- `compute_dtype`: float32 on CPU (no bf16 matmul units; measured slower), bfloat16 on GPU/TPU.
- `unroll_layers`: layers unrolled on CPU (XLA:CPU runs a scanned backward pass ~15% slower), one `nn.scan`
  step per layer elsewhere (compile time independent of depth; the accelerators' loops cost little).
- `attention`: "einsum" on CPU (the decoder's explicit einsum-softmax-einsum, measured there),
  `jax.nn.dot_product_attention` elsewhere: "cudnn" (its fused kernel) on GPU, "xla" on TPU.
  The decoder uses cuDNN only where it applies (`cudnn_applies`) and XLA's implementation otherwise.
- `cache_layout`: the sampler's KV cache, "heads_minor" on CPU (docs/performance.md), the decoder's own
  "general" [L, B, S, K, H] cache elsewhere.
- `remat`: on for TPU, off elsewhere (`config.model.remat=True` turns it on anywhere). Compiled for a v5e:2x2
  (`jaxreplay compile`, docs/performance.md), the paper's 205M model at the paper's batch (256 × 256) needs 29.45
  GiB of temporaries per chip without it, and a v5e has 16 GB; with each layer rematerialised it fits. It costs one
  more forward pass (8/6 of the model's FLOPs, within the 1.4× budget of issue 28), and the small models, which
  fit either way, are bound by HBM traffic on TPU, not by FLOPs. On CPU and GPU the paper's sizes fit without it.
- `sampler_compiler_options`: XLA options of the sampler's program (YNNPACK fusions off on CPU).
- `loop_pack_members`: a pack's step (train/pack_step.py) loops over its members on CPU (lax.map), where a
  batched matrix product of many small members is slower than their own products one after another (8 D=64
  members: 0.64× of a lone step per member vmapped, 0.86× looped, measured 2026-12-02 under load) and a looped
  member's arithmetic is the lone run's; it vmaps them elsewhere, where one wide program fills the device.

Each non-CPU choice runs on CPU in tests/test_platform.py (the packed step's in tests/test_pack.py) and is checked
against the CPU choice.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

CACHE_LAYOUTS = ("general", "heads_minor")
_CPU_SAMPLER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class Choices:
  platform: str
  compute_dtype: str
  unroll_layers: bool
  attention: str
  cache_layout: str
  remat: bool = False
  loop_pack_members: bool = False

  def scan_unroll(self, n_layers: int) -> int:
    """Layers per scan iteration: all of them (an unrolled loop) or one."""
    return n_layers if self.unroll_layers else 1


def choices(platform: str) -> Choices:
  if platform == "cpu":
    return Choices("cpu", compute_dtype="float32", unroll_layers=True, attention="einsum", cache_layout="heads_minor",
                   loop_pack_members=True)
  return Choices(platform, compute_dtype="bfloat16", unroll_layers=False,
                 attention="cudnn" if platform == "gpu" else "xla", cache_layout="general", remat=platform == "tpu")


def cudnn_applies(dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes these inputs: 16-bit floats, a head dimension ≤ 128 and a multiple
  of 8 (and, checked by the decoder, a causal mask: no KV cache, no packed segments, default positions)."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0


@functools.lru_cache(maxsize=None)
def sampler_compiler_options(platform: str) -> dict:
  """On CPU, XLA's YNNPACK fusions (the default for dots and reductions) run the decode loop's small matrices
  and cache reductions ~30% slower than its own kernels, so the sampler turns them off for its program alone.
  Empty where the option is unknown (another platform, another XLA)."""
  if platform != "cpu":
    return {}
  try:
    jax.jit(lambda x: x.sum(), compiler_options=_CPU_SAMPLER_OPTIONS).lower(jnp.zeros(2)).compile()
  except Exception:  # pragma: no cover - the option disappeared from XLA
    return {}
  return dict(_CPU_SAMPLER_OPTIONS)
