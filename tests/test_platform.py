"""Every non-CPU choice of `jaxreplay.platform` runs on CPU and agrees with the CPU choice.

In fp32 the choices must agree to rounding (atol 2e-5 on logits and gradients); bf16 compute is compared in
tests/test_bf16.py. cuDNN's kernel itself needs a GPU: the GPU's choices run here with XLA's implementation of
the same `jax.nn.dot_product_attention` call (the decoder falls back to it wherever cuDNN does not apply).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay import config as config_lib
from jaxreplay import platform as platform_lib
from jaxreplay.models import decoder as M
from jaxreplay.models import losses
from jaxreplay.models import sampler as S

L = 3


def model_section():
  m = config_lib.default().model
  m.update(d_model=32, n_layers=L, head_dim=8, seq_len=12, vocab_size=50)
  return m


def cfg_for(platform: str, dtype: str = "float32", **overrides) -> M.ModelConfig:
  return dataclasses.replace(M.ModelConfig.from_config(model_section(), dtype, platform), **overrides)


CPU = cfg_for("cpu")


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CPU, jax.random.key(0))
  return jax.tree.map(lambda x: 3.0 * x, p)  # a peaky model: sampled rows differ clearly


def test_the_choices_per_platform():
  cpu, gpu, tpu = (platform_lib.choices(p) for p in ("cpu", "gpu", "tpu"))
  assert (cpu.compute_dtype, cpu.attention, cpu.cache_layout, cpu.scan_unroll(6), cpu.remat) == (
      "float32", "einsum", "heads_minor", 6, False)
  assert (gpu.compute_dtype, gpu.attention, gpu.cache_layout, gpu.scan_unroll(6)) == ("bfloat16", "cudnn", "general", 1)
  assert (tpu.attention, tpu.cache_layout) == ("xla", "general")
  # the one place is the one used: the config's auto dtype, the model's scan and kernel, the sampler's options
  c = config_lib.default()
  assert [config_lib.compute_dtype_name(c, p) for p in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
  assert (CPU.scan_unroll, CPU.attention) == (L, "einsum")
  assert (cfg_for("gpu").scan_unroll, cfg_for("gpu").attention) == (1, "cudnn")
  assert platform_lib.sampler_compiler_options("gpu") == {} and platform_lib.sampler_compiler_options("cpu")
  assert platform_lib.cudnn_applies(jnp.bfloat16, 64) and not platform_lib.cudnn_applies(jnp.float32, 64)
  assert not platform_lib.cudnn_applies(jnp.bfloat16, 256)


def loss_and_grads(cfg, params, tokens, segments=None):
  def loss(p):
    return losses.next_token_loss(M.logits(cfg, p, tokens, segments_BT=segments), tokens)
  return jax.jit(jax.value_and_grad(loss))(params)


VARIANTS = {  # each accelerator choice alone, then all of the GPU's together (fp32, XLA's attention)
    "scan": dict(scan_unroll=1),
    "attention_xla": dict(attention="xla"),
    "attention_cudnn_fp32_falls_back": dict(attention="cudnn"),
    "remat": dict(remat=True),
    "gpu_fp32": dataclasses.asdict(cfg_for("gpu")) | dict(attention="xla", remat=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_accelerator_choice_gives_the_cpu_logits_loss_and_gradients(name, params):
  cfg = dataclasses.replace(CPU, **{k: v for k, v in VARIANTS[name].items() if k in ("scan_unroll", "attention", "remat")})
  assert cfg != CPU
  toks = np.asarray(jax.random.randint(jax.random.key(1), (3, 12), 0, 50))
  segs = np.asarray([[1] * 5 + [2] * 7, [1] * 12, [1] * 3 + [2] * 3 + [0] * 6])  # packed rows, padding
  for seg in (None, segs):
    want_loss, want_grads = loss_and_grads(CPU, params, toks, seg)
    got_loss, got_grads = loss_and_grads(cfg, params, toks, seg)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got_grads, want_grads)
  np.testing.assert_allclose(M.logits(cfg, params, toks), M.logits(CPU, params, toks), atol=2e-5, rtol=1e-5)
  # a KV-cache decode (the sampler's general layout) takes the masked attention path of the kernel
  out, cache = M.apply(cfg, params, toks[:, :4], cache=M.init_cache(cfg, 3), cache_index=0)
  pieces = [out] + [M.apply(cfg, params, toks[:, t:t + 1], cache=cache, cache_index=t)[0] for t in (4,)]
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), M.logits(CPU, params, toks)[:, :5], atol=2e-5, rtol=1e-5)


def sample(cfg, params, layout, temperature, monkeypatch=None, options=None):
  if options is not None:  # another platform's XLA options for the sampler's program
    monkeypatch.setattr(platform_lib, "sampler_compiler_options", lambda platform: options)
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (4, 2), 0, 50), np.int32)
  sc = S.SamplingConfig(temperature=temperature)
  fn = S.make_sampler(cfg, sc, 4, 2, 12, return_logits=True, layout=layout, chunks=2)
  return fn(params, prompt, jax.random.key(3))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_accelerator_sampler_gives_the_cpu_samples(temperature, params, monkeypatch):
  """The GPU's sampler (general cache layout, scanned layers, XLA's attention, no XLA options) against the
  CPU's (heads_minor layout, unrolled, einsum, YNNPACK off): the same tokens, logits to rounding."""
  want = sample(CPU, params, "heads_minor", temperature)
  S._make_sampler.cache_clear()
  gpu = cfg_for("gpu", attention="xla")
  got = sample(gpu, params, platform_lib.choices("gpu").cache_layout, temperature, monkeypatch,
               options=platform_lib.sampler_compiler_options("gpu"))
  S._make_sampler.cache_clear()
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], atol=5e-5, rtol=1e-5)
  assert len({tuple(r) for r in np.asarray(want[0])}) > 1
