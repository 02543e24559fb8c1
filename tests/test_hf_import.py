"""The decoder, imported from Hugging Face checkpoints, against transformers on tiny random checkpoints made here (CPU, no downloads)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Llama import tests compare against torch (pip install torch)")
transformers = pytest.importorskip("transformers", reason="the Llama import tests need transformers")

from jaxreplay.errors import HFImportError
from jaxreplay import sharding  # noqa: E402
from jaxreplay.models import decoder, hf_import, sampler  # noqa: E402

V = 300
_logits = jax.jit(decoder.logits, static_argnums=0)  # eager flax compiles op by op: slow on a shared 2-core CPU
_apply_cached = jax.jit(lambda cfg, p, t, c, i: decoder.apply(cfg, p, t, cache=c, cache_index=i), static_argnums=0)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def _randomise(model, seed):
  """Weights far from HF's near-zero init, so that every piece (biases, norms, RoPE) changes the logits."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)


def make_checkpoint(directory, family, seed=0, **overrides):
  if family == "llama":
    cfg = transformers.LlamaConfig(**COMMON, max_position_embeddings=256, tie_word_embeddings=True,
                                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=32),
                                   rope_theta=500000.0, **overrides)
    model = transformers.LlamaForCausalLM(cfg)
  elif family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, **overrides))
  else:
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False,
                                                                   **overrides))
  _randomise(model, seed)
  model.eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {f: (str(root / f), make_checkpoint(str(root / f), f)) for f in ("llama", "qwen2", "qwen3")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_and_greedy_generation_match_transformers(checkpoints, family):
  directory, model = checkpoints[family]
  cfg, params, _ = hf_import.load(directory, seq_len=64)
  assert cfg.family == family and cfg.n_kv_heads == 2
  assert cfg.tie_embeddings == (family == "llama") and cfg.qkv_bias == (family == "qwen2")
  tokens = np.random.default_rng(0).integers(0, V, (2, 48))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(_logits(cfg, params, jnp.asarray(tokens)))
  assert np.abs(ref).max() > 1.0  # not a degenerate near-uniform model
  np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)

  prompt = tokens[:, :6]
  model.generation_config.eos_token_id = None  # full length, as replay sampling
  model.generation_config.pad_token_id = 0
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=26).numpy()
  greedy = sampler.SamplingConfig(temperature=0)
  got = np.asarray(sampler.sample(cfg, params, prompt, jax.random.key(0), length=32, sc=greedy))
  np.testing.assert_array_equal(got, want)
  general = sampler.make_sampler(cfg, greedy, 2, 6, 32, layout="general")  # the layout off CPU
  np.testing.assert_array_equal(np.asarray(general(params, prompt, jax.random.key(0))), want)
  assert len(set(got[0, 6:].tolist())) > 3  # greedy decoding does not collapse onto one token


def test_cache_prefill_plus_decode_equals_full_forward(checkpoints):
  cfg, params, _ = hf_import.load(checkpoints["llama"][0], seq_len=32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 12)))
  full = _logits(cfg, params, tokens)
  cache = decoder.init_cache(cfg, 2, 16)
  first, cache = _apply_cached(cfg, params, tokens[:, :8], cache, 0)
  rest = []
  for t in range(8, 12):
    step, cache = _apply_cached(cfg, params, tokens[:, t:t + 1], cache, t)
    rest.append(step)
  np.testing.assert_allclose(jnp.concatenate([first] + rest, axis=1), full, atol=1e-4, rtol=1e-4)


def test_segments_make_packed_examples_independent(checkpoints):
  cfg, params, _ = hf_import.load(checkpoints["qwen2"][0], seq_len=32)
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, V, (1, 7)), rng.integers(0, V, (1, 9))
  packed = jnp.asarray(np.concatenate([a, b, np.zeros((1, 4), int)], axis=1))
  segments = jnp.asarray([[1] * 7 + [2] * 9 + [0] * 4])
  positions = decoder.segment_positions(segments)
  assert positions[0, 7] == 0 and positions[0, 15] == 8
  out = _logits(cfg, params, packed, segments, positions)
  # Each example alone, right-padded to the same shape (one compilation): causal, so the padding is unseen.
  alone = lambda x: _logits(cfg, params, jnp.asarray(np.pad(x, ((0, 0), (0, 20 - x.shape[1])))),
                            jnp.ones((1, 20), jnp.int32), jnp.arange(20)[None])[:, :x.shape[1]]
  np.testing.assert_allclose(out[:, :7], alone(a), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out[:, 7:16], alone(b), atol=1e-4, rtol=1e-4)


MESH_SCRIPT = """
import json, sys
import jax
from jaxreplay import sharding
from jaxreplay.models import hf_import
directory, out = sys.argv[1:3]
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
cfg, params, _ = hf_import.load(directory, seq_len=32, mesh=mesh)
q, bias = params["blocks"]["q_proj"], params["blocks"]["q_bias"]
hf_import.save_hf(params, cfg, directory, out)
print(json.dumps(dict(devices=len(jax.devices()), shape=list(q.shape), spec=str(q.sharding.spec),
                      shard=list(q.addressable_shards[0].data.shape), bias_mesh=dict(bias.sharding.mesh.shape))))
"""


def test_import_onto_a_mesh_and_export_round_trip(checkpoints, tmp_path):
  """Onto a 4-device mesh (fsdp 2 × tensor 2, in a subprocess with 4 host devices): the weights arrive
  sharded, and saved back from the shards they give the original model's logits."""
  import json
  import os
  import subprocess
  import sys
  directory, model = checkpoints["qwen2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, directory, str(tmp_path / "out")], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["devices"] == 4 and got["shape"] == [2, 64, 4, 16]
  assert got["shard"] == [2, 32, 2, 16] and "fsdp" in got["spec"] and "tensor" in got["spec"]
  assert got["bias_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = torch.tensor(np.random.default_rng(3).integers(0, V, (1, 10)))
  with torch.no_grad():
    np.testing.assert_allclose(again(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-5)


def test_partition_rules_shard_heads_and_mlp_over_tensor(checkpoints):
  cfg = hf_import.config_from_hf(hf_import.read_config(checkpoints["llama"][0]))
  abstract = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))

  class FakeMesh:
    shape = {"data": 1, "fsdp": 2, "tensor": 2}

  spec = lambda *path: sharding.param_spec([jax.tree_util.DictKey(p) for p in path],
                                           abstract[path[0]][path[1]].shape if len(path) > 1
                                           else abstract[path[0]].shape, FakeMesh)
  assert tuple(spec("blocks", "q_proj")) == (None, "fsdp", "tensor", None)
  assert tuple(spec("blocks", "k_proj")) == (None, "fsdp", "tensor", None)
  assert tuple(spec("blocks", "down_proj")) == (None, "tensor", "fsdp")
  assert tuple(spec("blocks", "input_layernorm")) == (None, None)


def test_unsupported_checkpoints_fail_with_one_sentence(tmp_path):
  with pytest.raises(HFImportError, match="model_type='gpt2'"):
    hf_import.config_from_hf(dict(model_type="gpt2"))
  bad = dict(model_type="llama", **{k: v for k, v in COMMON.items()}, rope_scaling=dict(rope_type="yarn", factor=4.0))
  bad = {k if k != "hidden_size" else "hidden_size": v for k, v in bad.items()}
  with pytest.raises(HFImportError, match="yarn"):
    hf_import.config_from_hf(bad)
  with pytest.raises(HFImportError, match="not a directory"):
    hf_import.resolve(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty")
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump(dict(model_type="llama", **COMMON), f)
  with pytest.raises(HFImportError, match="no \\*.safetensors"):
    hf_import.load(str(tmp_path / "empty"))


SHARDED = r"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from jaxreplay import sharding
from jaxreplay.models import decoder, hf_import, sampler
d = sys.argv[1]
cfg, one, _ = hf_import.load(d, seq_len=32)
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
_, four, _ = hf_import.load(d, seq_len=32, mesh=mesh)
assert four["blocks"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None), four["blocks"]["q_proj"].sharding
assert four["embed"].sharding.spec == P("tensor", "fsdp")
tokens = np.random.default_rng(0).integers(0, 300, (4, 16)).astype(np.int32)
f = jax.jit(decoder.logits, static_argnums=0)
np.testing.assert_allclose(f(cfg, four, sharding.put_batch(tokens, mesh)), f(cfg, one, tokens), atol=2e-4, rtol=1e-4)
greedy = sampler.SamplingConfig(temperature=0)
a = sampler.sample(cfg, one, tokens[:, :3], jax.random.key(0), 16, greedy)
b = sampler.sample(cfg, four, tokens[:, :3], jax.random.key(0), 16, greedy, mesh)
np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("SHARDED_OK")
"""


@pytest.mark.slow  # a subprocess that compiles everything again: ~15 s alone, over a minute on a busy 2-core CPU
def test_sharded_import_matches_one_device(checkpoints):
  """fsdp × tensor = 2 × 2 host devices in a subprocess: same logits and greedy tokens as one device."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED, checkpoints["llama"][0]], env=env, capture_output=True,
                       text=True, timeout=300)
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]


def test_unreachable_hub_id_fails_with_one_sentence(monkeypatch):
  import huggingface_hub

  def offline(*a, **k):
    raise OSError("no network")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(HFImportError, match="could not be fetched"):
    hf_import.resolve("no-such-org/no-such-model")
