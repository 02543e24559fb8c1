"""Hugging Face checkpoints (Llama 3.x, Qwen2/2.5, Qwen3, Mistral-style) into the decoder's parameters.

Reads config.json and the safetensors files of a local directory (one file or a sharded index), maps each
tensor to its place in the stacked Flax tree and builds every parameter directly on the mesh with
`jax.make_array_from_callback`, so each device (and each host) materialises only its own shard. The
safetensors reader here is a few lines over `np.memmap`: it needs neither torch nor the safetensors package
and reads bfloat16 through `ml_dtypes`. `resolve` turns a hub id into a local snapshot with huggingface_hub
when the machine can reach the hub; everything else works on local directories only.

`save_hf` writes parameters back as a Hugging Face checkpoint (config.json + model.safetensors), so a
finetuned model can be evaluated with other tools.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxreplay.errors import HFImportError
from jaxreplay import sharding
from jaxreplay.models import decoder as dec

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}


def resolve(path_or_id: str) -> str:
  """A local checkpoint directory: `path_or_id` itself, or a hub snapshot (needs network access)."""
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
    raise HFImportError(f"model path {path_or_id!r} is not a directory: give a local Hugging Face checkpoint "
                        "directory (config.json + *.safetensors) or a hub id like 'org/name'.")
  try:
    from huggingface_hub import snapshot_download  # only for hub ids
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
  except Exception as e:  # no network, unknown repo, gated model, huggingface_hub missing
    raise HFImportError(f"model path {path_or_id!r} is not a local directory and could not be fetched from the "
                        f"Hugging Face hub ({type(e).__name__}): download the checkpoint elsewhere and point "
                        "model.path at its directory.") from None


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise HFImportError(f"{directory} has no config.json: point model.path at a Hugging Face checkpoint directory.")
  with open(path) as f:
    return json.load(f)


def _rope(hf: dict) -> tuple[float, tuple | None]:
  """(theta, llama3 scaling) from either the old (rope_theta + rope_scaling) or the new (rope_parameters) keys."""
  params = hf.get("rope_parameters") or {}
  if "layer_types" in params or any(isinstance(v, dict) for v in params.values()):
    raise HFImportError("per-layer rope_parameters are not supported: this importer covers Llama/Qwen models.")
  scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  if not scaling:
    return theta, None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise HFImportError(f"rope scaling type {kind!r} is not supported (only 'llama3' and none): this checkpoint "
                        "needs a RoPE variant the Flax model does not implement.")
  orig = scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
  return theta, (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                 float(orig))


def _ids(v) -> tuple:
  return () if v is None else tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def config_from_hf(hf: dict, seq_len: int = 512, dtype="float32", remat: bool = False,
                   scan_unroll: int = 1) -> dec.ModelConfig:
  family = hf.get("model_type", "")
  if family not in SUPPORTED:
    raise HFImportError(f"model_type={family!r} is not supported: use a checkpoint of {', '.join(SUPPORTED)}.")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise HFImportError(f"hidden_act={act!r} is not supported: the Flax Llama uses SwiGLU (silu).")
  if hf.get("mlp_bias") or (family == "llama" and hf.get("attention_bias")):
    raise HFImportError("checkpoints with MLP or output-projection biases are not supported.")
  window = hf.get("sliding_window")
  if window and (hf.get("use_sliding_window", family == "mistral")) and window < seq_len:
    raise HFImportError(f"sliding_window={window} is shorter than seq_len={seq_len}: sliding-window attention is "
                        "not implemented; use seq_len ≤ the window.")
  N = int(hf["num_attention_heads"])
  theta, scaling = _rope(hf)
  eos, bos, pad = (_ids(hf.get(f"{k}_token_id")) for k in ("eos", "bos", "pad"))
  return dec.ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
      n_heads=N, n_kv_heads=int(hf.get("num_key_value_heads") or N),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // N), d_mlp=int(hf["intermediate_size"]),
      mlp="swiglu", norm_scale=True, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_base=theta,
      rope_llama3=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", family != "mistral")),
      qkv_bias=family == "qwen2" or bool(hf.get("attention_bias") and family != "llama"),
      qk_norm=family == "qwen3", seq_len=int(seq_len), bos_id=bos[0] if bos else -1, eos_ids=eos,
      pad_id=pad[0] if pad else (eos[0] if eos else 0), family=family, dtype=jnp.dtype(dtype), remat=remat,
      scan_unroll=max(1, min(int(scan_unroll), int(hf["num_hidden_layers"]))))


# ------------------------------------------------------------------------------------------------ safetensors

def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


def tensor_index(directory: str) -> dict:
  """{tensor name: (file, dtype, shape, byte offset)} over model.safetensors or a sharded index."""
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise HFImportError(f"{directory} has no *.safetensors files: save the model with safe_serialization=True.")
  out = {}
  for name in files:
    path = os.path.join(directory, name)
    header, base = _read_header(path)
    for key, info in header.items():
      if info["dtype"] not in _DTYPES:
        raise HFImportError(f"{path}: tensor {key} has dtype {info['dtype']}, which this importer cannot read.")
      out[key] = (path, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0])
  return out


def read_tensor(entry) -> np.ndarray:
  path, dtype, shape, offset = entry
  return np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=offset, shape=shape)


# --------------------------------------------------------------------------------------------------- mapping

def _layer_map(cfg: dec.ModelConfig) -> dict:
  """Flax block leaf → (HF name within a layer, transform from the HF array [out, in] to ours)."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  m = {
      "q_proj": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
      "k_proj": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
      "v_proj": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
      "o_proj": ("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
      "gate_proj": ("mlp.gate_proj.weight", lambda w: w.T),
      "up_proj": ("mlp.up_proj.weight", lambda w: w.T),
      "down_proj": ("mlp.down_proj.weight", lambda w: w.T),
      "input_layernorm": ("input_layernorm.weight", lambda w: w),
      "post_attention_layernorm": ("post_attention_layernorm.weight", lambda w: w),
  }
  if cfg.qkv_bias:
    m.update(q_bias=("self_attn.q_proj.bias", lambda b: b.reshape(N, H)),
             k_bias=("self_attn.k_proj.bias", lambda b: b.reshape(K, H)),
             v_bias=("self_attn.v_proj.bias", lambda b: b.reshape(K, H)))
  if cfg.qk_norm:
    m.update(q_norm=("self_attn.q_norm.weight", lambda w: w), k_norm=("self_attn.k_norm.weight", lambda w: w))
  return m


def _sources(cfg: dec.ModelConfig, index: dict) -> dict:
  """{flax path tuple: fn(index tuple) -> np.ndarray of that slice, float32}."""
  def need(name):
    if name not in index:
      raise HFImportError(f"the checkpoint has no tensor {name!r}: it does not match its config.json "
                          f"(model_type {cfg.family}); re-save it with transformers.")
    return index[name]

  def whole(name, fn=lambda w: w):
    entry = need(name)
    return lambda idx: np.asarray(fn(read_tensor(entry))[idx], np.float32)

  out = {("embed",): whole("model.embed_tokens.weight"), ("norm",): whole("model.norm.weight")}
  if not cfg.tie_embeddings:
    out[("unembed",)] = whole("lm_head.weight", lambda w: w.T)
  for leaf, (name, fn) in _layer_map(cfg).items():
    entries = [need(f"model.layers.{l}.{name}") for l in range(cfg.n_layers)]

    def stacked(idx, entries=entries, fn=fn):
      layers = range(cfg.n_layers)[idx[0]]
      return np.stack([np.asarray(fn(read_tensor(entries[l]))[idx[1:]], np.float32) for l in layers])

    out[("blocks", leaf)] = stacked
  return out


def load_params(directory: str, cfg: dec.ModelConfig, mesh=None):
  """Parameters of `cfg`'s shapes, fp32, each placed with `sharding.param_shardings` on `mesh` (or device 0)."""
  abstract = jax.eval_shape(lambda: dec.init_params(cfg, jax.random.key(0)))
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
  shardings = sharding.param_shardings(abstract, mesh)
  sources = _sources(cfg, tensor_index(directory))

  def build(path, shape, sh):
    key = tuple(getattr(p, "key", str(p)) for p in path)
    src = sources[key]
    return jax.make_array_from_callback(shape.shape, sh, src)

  return jax.tree_util.tree_map_with_path(build, abstract, shardings)


def load(path_or_id: str, seq_len: int = 512, dtype="float32", mesh=None):
  """(ModelConfig, params, local directory) of a Hugging Face checkpoint."""
  directory = resolve(path_or_id)
  cfg = config_from_hf(read_config(directory), seq_len, dtype)
  return cfg, load_params(directory, cfg, mesh), directory


# ----------------------------------------------------------------------------------------------------- export

def save_hf(params, cfg: dec.ModelConfig, source_dir: str, out_dir: str):
  """Writes params as OUT_DIR/model.safetensors (float32) with SOURCE_DIR's config and tokenizer files."""
  from safetensors.numpy import save_file  # the `hf` extra
  os.makedirs(out_dir, exist_ok=True)
  p = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  D = cfg.d_model
  tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["norm"]}
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = p["unembed"].T
  inverse = dict(q_proj=lambda w: w.reshape(D, -1).T, k_proj=lambda w: w.reshape(D, -1).T,
                 v_proj=lambda w: w.reshape(D, -1).T, o_proj=lambda w: w.reshape(-1, D).T,
                 gate_proj=lambda w: w.T, up_proj=lambda w: w.T, down_proj=lambda w: w.T,
                 q_bias=lambda b: b.reshape(-1), k_bias=lambda b: b.reshape(-1), v_bias=lambda b: b.reshape(-1))
  for leaf, (name, _) in _layer_map(cfg).items():
    for l in range(cfg.n_layers):
      tensors[f"model.layers.{l}.{name}"] = inverse.get(leaf, lambda w: w)(p["blocks"][leaf][l])
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
  for name in os.listdir(source_dir):
    if name.endswith(".json") and "safetensors" not in name or name.startswith("tokenizer"):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
