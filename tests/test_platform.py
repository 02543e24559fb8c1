"""Every non-CPU choice of `jaxreplay.platform` runs on CPU and agrees with the CPU choice.

Tolerances: in fp32 the choices must agree to rounding (atol 2e-5 on logits and gradients, rtol 1e-6 on the
loss); the TPU's whole choice (bf16 compute) to bf16's rounding of a 2-layer model (logits within 2% of the
largest, loss rtol 1e-2). cuDNN's kernel itself needs a GPU: here the decoder's request for it is checked (it asks for
cuDNN exactly where `cudnn_applies`) and the same `jax.nn.dot_product_attention` call runs with XLA's kernel.
The model is tiny and each variant compiles one program, so the file runs in well under a minute.
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

from helpers import dot_operand_dtypes

L, T, V = 2, 10, 40
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (3, T), 0, V))
SEGMENTS = np.asarray([[1] * 4 + [2] * 6, [1] * T, [1] * 3 + [2] * 3 + [0] * 4])  # packed rows, padding


def model_section():
  m = config_lib.default().model
  m.update(d_model=32, n_layers=L, head_dim=8, seq_len=T, vocab_size=V)
  return m


def cfg_for(platform: str, dtype: str = "float32", **overrides) -> M.ModelConfig:
  return dataclasses.replace(M.ModelConfig.from_config(model_section(), dtype, platform), **overrides)


CPU = cfg_for("cpu")


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CPU, jax.random.key(0))
  return jax.tree.map(lambda x: 3.0 * x, p)  # a peaky model: sampled rows differ clearly


def outputs(cfg, params):
  """One compiled program: loss and gradients on plain and packed rows, logits, and a KV-cache decode (prefill
  4 tokens, then one) that takes the masked attention path of the kernel."""

  def run(p):
    def loss(p, segments):
      return losses.next_token_loss(M.logits(cfg, p, TOKENS, segments_BT=segments), TOKENS)
    out = {name: jax.value_and_grad(loss)(p, seg) for name, seg in (("plain", None), ("packed", SEGMENTS))}
    out["logits"] = M.logits(cfg, p, TOKENS)
    first, cache = M.apply(cfg, p, TOKENS[:, :4], cache=M.init_cache(cfg, 3), cache_index=0)
    out["decode"] = jnp.concatenate([first, M.apply(cfg, p, TOKENS[:, 4:5], cache=cache, cache_index=4)[0]], 1)
    return out

  return jax.jit(run)(params)


@pytest.fixture(scope="module")
def cpu_outputs(params):
  return outputs(CPU, params)


def test_the_choices_per_platform():
  cpu, gpu, tpu = (platform_lib.choices(p) for p in ("cpu", "gpu", "tpu"))
  assert (cpu.compute_dtype, cpu.attention, cpu.cache_layout, cpu.scan_unroll(6), cpu.remat) == (
      "float32", "einsum", "heads_minor", 6, False)
  assert (gpu.compute_dtype, gpu.attention, gpu.cache_layout, gpu.scan_unroll(6)) == ("bfloat16", "cudnn", "general", 1)
  assert (tpu.compute_dtype, tpu.attention, tpu.cache_layout, tpu.scan_unroll(6)) == ("bfloat16", "xla", "general", 1)
  assert cpu.loop_pack_members and not gpu.loop_pack_members and not tpu.loop_pack_members
  # the one place is the one used: the config's auto dtype, the model's scan and kernel, the sampler's options
  c = config_lib.default()
  assert [config_lib.compute_dtype_name(c, p) for p in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
  assert (CPU.scan_unroll, CPU.attention) == (L, "einsum")
  assert (cfg_for("gpu").scan_unroll, cfg_for("gpu").attention) == (1, "cudnn")
  assert platform_lib.sampler_compiler_options("gpu") == {} and platform_lib.sampler_compiler_options("cpu")
  assert platform_lib.cudnn_applies(jnp.bfloat16, 64) and not platform_lib.cudnn_applies(jnp.float32, 64)
  assert not platform_lib.cudnn_applies(jnp.bfloat16, 256) and not platform_lib.cudnn_applies(jnp.bfloat16, 12)


VARIANTS = {  # each accelerator choice alone, then all of the GPU's together (fp32, XLA's attention)
    "scan": dict(scan_unroll=1),
    "attention_xla": dict(attention="xla"),
    "attention_cudnn_fp32_falls_back": dict(attention="cudnn"),
    "remat": dict(remat=True),
    "gpu_fp32": dict(scan_unroll=cfg_for("gpu").scan_unroll, attention="xla", remat=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_accelerator_choice_gives_the_cpu_logits_loss_and_gradients(name, params, cpu_outputs):
  cfg = dataclasses.replace(CPU, **VARIANTS[name])
  assert cfg != CPU
  got = outputs(cfg, params)
  for case in ("plain", "packed"):
    (got_loss, got_grads), (want_loss, want_grads) = got[case], cpu_outputs[case]
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got_grads, want_grads)
  np.testing.assert_allclose(got["logits"], cpu_outputs["logits"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got["decode"], cpu_outputs["logits"][:, :5], atol=2e-5, rtol=1e-5)


def close_in_bf16(got, want):
  """Within 2% of the largest logit: bf16 keeps 8 bits of mantissa, through 2 layers."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


def test_the_tpu_choice_in_bf16_gives_the_cpu_logits_and_loss(params, cpu_outputs):
  """The TPU's whole choice as from_config makes it (bf16 compute, scanned layers, XLA's attention) runs
  here as it is; bf16 rounding of activations bounds the agreement."""
  tpu = cfg_for("tpu", platform_lib.choices("tpu").compute_dtype)
  assert (tpu.dtype, tpu.scan_unroll, tpu.attention) == (jnp.bfloat16, 1, "xla")
  got = outputs(tpu, params)
  for case in ("plain", "packed"):
    np.testing.assert_allclose(got[case][0], cpu_outputs[case][0], rtol=1e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got[case][1]))  # fp32 params, fp32 grads
  close_in_bf16(got["logits"], cpu_outputs["logits"])
  close_in_bf16(got["decode"], cpu_outputs["logits"][:, :5])
  # and it did compute in bf16: further from fp32 than fp32 rounding (the fp32 variants agree to 2e-5)
  assert np.abs(np.asarray(got["logits"]) - cpu_outputs["logits"]).max() > 1e-3 * np.abs(cpu_outputs["logits"]).max()


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_each_platforms_dtype_is_the_dtype_its_programs_multiply_in(platform, params):
  """What `choices(platform).compute_dtype` claims, through the config's auto dtype and from_config, is the
  operand type of every matrix product of the lowered forward pass and of the KV-cache decode."""
  name = config_lib.compute_dtype_name(config_lib.default(), platform)
  assert name == platform_lib.choices(platform).compute_dtype
  cfg = cfg_for(platform, name, attention="xla" if platform == "gpu" else cfg_for(platform).attention)
  want = {"float32": ("f32", "f32"), "bfloat16": ("bf16", "bf16")}[name]
  fwd = dot_operand_dtypes(lambda p, t: M.logits(cfg, p, t), params, TOKENS)
  dec = dot_operand_dtypes(lambda p, t: M.apply(cfg, p, t, cache=M.init_cache(cfg, 3), cache_index=0)[0],
                           params, TOKENS[:, :4])
  # at least 7 products: q, k, v in one where fused, scores, values, out, MLP (2), unembedding
  assert len(fwd) >= 7 and len(dec) >= 7 and set(fwd) == set(dec) == {want}, (fwd, dec)


def test_the_gpu_choice_asks_for_cudnn_exactly_where_it_applies(params, cpu_outputs, monkeypatch):
  """bf16 training rows on the GPU's choice request cuDNN; packed rows and the KV-cache decode (masks cuDNN's
  causal kernel does not take) request XLA's. The call itself runs with XLA's kernel (no GPU here)."""
  real, asked = jax.nn.dot_product_attention, []

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  gpu = cfg_for("gpu", platform_lib.choices("gpu").compute_dtype)
  assert (gpu.dtype, gpu.attention) == (jnp.bfloat16, "cudnn")
  jax.block_until_ready(M.logits(gpu, params, TOKENS))
  assert asked and set(asked) == {"cudnn"}  # (flax's scan traces its body more than once)
  asked.clear()
  jax.block_until_ready(M.logits(gpu, params, TOKENS, segments_BT=SEGMENTS))
  M.apply(gpu, params, TOKENS[:, :4], cache=M.init_cache(gpu, 3), cache_index=0)
  assert asked and set(asked) == {"xla"}
  close_in_bf16(M.logits(gpu, params, TOKENS), cpu_outputs["logits"])


def sample(cfg, params, layout, temperature, monkeypatch=None, options=None):
  if options is not None:  # another platform's XLA options for the sampler's program
    monkeypatch.setattr(platform_lib, "sampler_compiler_options", lambda platform: options)
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (4, 2), 0, V), np.int32)
  sc = S.SamplingConfig(temperature=temperature)
  fn = S.make_sampler(cfg, sc, 4, 2, T, return_logits=True, layout=layout, chunks=2)
  return fn(params, prompt, jax.random.key(3))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_accelerator_sampler_gives_the_cpu_samples(temperature, params, monkeypatch):
  """The GPU's sampler (general cache layout, scanned layers, XLA's attention, no XLA options) against the
  CPU's (heads_minor layout, unrolled, einsum, YNNPACK off): the same tokens, logits to rounding."""
  want = sample(CPU, params, "heads_minor", temperature)
  S.clear_compiled()
  gpu = cfg_for("gpu", attention="xla")
  got = sample(gpu, params, platform_lib.choices("gpu").cache_layout, temperature, monkeypatch,
               options=platform_lib.sampler_compiler_options("gpu"))
  S.clear_compiled()
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], atol=5e-5, rtol=1e-5)
  assert len({tuple(r) for r in np.asarray(want[0])}) > 1
