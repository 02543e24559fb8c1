"""Defaults for every stage and validation that turns bad values into one clear sentence.

A config is an `ml_collections.ConfigDict`; experiment files in `sweeps/` start from `default()` and
override what they need. `validate` runs before any work and raises `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import json
import math

import ml_collections

from jaxreplay import io, platform as platform_lib, rundir
from jaxreplay.errors import ConfigError
from jaxreplay.io import write_json

LENGTH_KEYS = ("tokens", "tokens_per_param", "epochs", "steps", "wall_time_s")
REPLAY_METHODS = ("none", "kl", "ntp", "kl_downstream", "replace")
REPLAY_SOURCES = ("real", "self")
REPLAY_TEACHERS = ("auto", "forward", "sampled")
SAMPLED_TEACHER_MAX_BYTES = 1 << 30  # per device, for teacher='auto'
SCHEDULES = ("constant", "cosine", "wsd")
NUM_RESERVED_IDS = 10
# Model keys that say how a run computes, not what its weights are: a finetuning run keeps its own. Every other
# model key its parent's export records (d_model, n_layers, head_dim, vocab_size, mlp_ratio, rope_base, ...,
# and any key added later) is the parent's.
RUN_MODEL_KEYS = ("seq_len", "compute_dtype", "remat", "scan_unroll", "param_count")


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"  # pretrain | finetune
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, mlp_ratio=4,
      rope_base=10_000.0, norm_eps=1e-6,
      compute_dtype="auto",  # auto: float32 on CPU, bfloat16 on GPU/TPU
      remat=False,
      scan_unroll=0,  # layers per scan step; 0 = auto (unrolled on CPU, scanned elsewhere)
      param_count="paper",  # which count `stop.tokens_per_param` uses: paper (12LD²+DV) or true (12LD²+2DV)
      # a Hugging Face Llama/Qwen checkpoint directory (or hub id) to finetune: its config.json sets the shape
      # (the shape keys above are then unused), its tokenizer reads data.kind='chat' data
      path="",
  ))

  c.data = ml_collections.ConfigDict(dict(
      path="",  # a token-file directory (train.bin, valid.bin, meta.json) made by `jaxreplay data tokenize`
      dataset_id=-1,  # id written into the first token of every row; -1 takes it from the data's metadata
      mix_path="",  # optional second dataset mixed into each batch (capacity experiments)
      mix_fraction=0.0,  # fraction of each batch's rows taken from mix_path
      prefetch=2,
      num_workers=0,
      kind="tokens",  # tokens: a token directory in data.path | chat: JSON lines of prompt/response (model.path)
      # chat data: train/valid JSON lines (valid empty: hold out valid_fraction of train), how an example's
      # fields become a chat, what to do with examples longer than a row, where the tokenized data is cached
      train="", valid="", valid_fraction=0.05, prompt_key="prompt", response_key="response",
      prompt_template="{prompt}", system="", long="truncate", cache_dir="",
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_tokens=10_000_000, schedule="constant", decay_fraction=0.2,  # wsd: final fraction decays
      b1=0.9, b2=0.999,
      b1_half_life_tokens=0.0, b2_half_life_tokens=0.0,  # > 0 replaces b1/b2: β = 0.5^(tokens_per_step / t½)
      eps=1e-8, weight_decay=0.02, grad_clip=0.0,
      batch_size=256,  # global sequences per optimizer step
  ))

  c.train = ml_collections.ConfigDict(dict(
      microbatches=1,  # gradient accumulation: each step's batch runs in this many chunks
  ))

  c.stop = ml_collections.ConfigDict(dict(
      tokens=0, tokens_per_param=0.0, epochs=0.0, steps=0, wall_time_s=0.0,  # exactly one length criterion
      target_loss=0.0,  # stop once the eval loss on the training data reaches this (0: off)
      early_stop_evals=0,  # stop after this many evals without a new best (0: off)
      # stop once the evaluated metric target_metric (e.g. 'acc_add', 'mcq_mean') reaches target, from below
      # (target_mode 'max') or above ('min'); 'auto': max for accuracies (names with 'acc', or 'mcq...'), else min
      target_metric="", target=0.0, target_mode="auto",
  ))
  _add_evaluation_and_replay(c)
  c.lock()  # a misspelled key is an error, never a silently new setting
  return c


def _add_evaluation_and_replay(c: ml_collections.ConfigDict):
  """The groups around the training loop: evaluation, checkpoints, logging, mesh, init, replay, LoRA, export."""
  c.eval = ml_collections.ConfigDict(dict(
      every_tokens=10_000_000, tokens=1_000_000, batch_size=64,
      at_start=True,
      # lm-evaluation-harness tasks scored at every evaluation (comma-separated; needs the `eval` extra)
      lm_eval_tasks="", lm_eval_limit=0, lm_eval_include_path="",
      every_steps=0,  # > 0 replaces every_tokens
      valid_rows=0,  # chat data: held-out rows evaluated (0: all)
      replay_rows=0,  # forgetting probes of this many rows: π_pre's samples (self_*), held-out replay text (real_*)
      mcq="",  # multiple-choice benchmarks NAME:PATH[,NAME:PATH...] (JSON lines), scored as chats (model.path)
      mcq_limit=0, mcq_seed=42,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, every_minutes=10.0, keep_last=2, keep_every_steps=0, async_save=True,
  ))

  c.log = ml_collections.ConfigDict(dict(
      every_steps=10, progress=True, tensorboard=False, wandb=False, wandb_project="jaxreplay",
  ))

  # data=-1 takes every device not used by fsdp and tensor.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.init = ml_collections.ConfigDict(dict(
      **{"from": ""},  # workdir of a finished run whose exported weights start this run (finetuning)
  ))

  c.replay = ml_collections.ConfigDict(dict(
      method="none", source="self", coeff=1.0,
      batch_size=0,  # replay rows per step; 0 = the downstream batch size
      buffer=16,  # self-generated: batches sampled per refill
      temperature=1.0, top_k=0, top_p=1.0,
      dataset_id=-1,  # prompt id for self-generated replay; -1 = the pretraining data's id
      prompt_ids="",  # several prompt ids, e.g. "0,1,2": rows split evenly among them (toy continual tasks)
      cache_dir="",  # share self-generated samples across runs of a sweep
      # KL teacher logits on self-generated rows: 'sampled' keeps π_pre's logits from sampling (no frozen
      # forward per step; a [buffer, rows, T, V] fp32 buffer), 'forward' runs π_pre on each replay batch,
      # 'auto' = sampled when that buffer is ≤ 1 GiB per data-parallel device (see `replay_teacher`)
      teacher="auto",
      path="",  # real replay data; empty = the pretraining run's data; chat runs: {"text": ...} JSON lines
      text_key="text", max_tokens=0,  # chat runs' real replay: the JSON key, tokens read (0: all)
  ))

  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0))  # rank 0 = full finetuning
  c.export = ml_collections.ConfigDict(dict(hf=False))  # model.path runs: also write WORKDIR/hf (safetensors)


def _positive(c, key: str, allow_zero: bool = False):
  value = c[key]
  if value < 0 if allow_zero else value <= 0:
    raise ConfigError(f"config.{key}={value!r} is invalid: it must be {'≥ 0' if allow_zero else '> 0'}.")


def _one_of(c, key: str, choices, value=None):
  value = c[key] if value is None else value
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: use one of {', '.join(choices)}.")


def _fraction(c, key: str, interval: str = "[0, 1)"):
  """The value must lie in the interval, '[0, 1)' or '(0, 1]'."""
  value = c[key]
  if not (0.0 <= value < 1.0 if interval == "[0, 1)" else 0.0 < value <= 1.0):
    raise ConfigError(f"config.{key}={value} must lie in {interval}.")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every value a user can set; returns the config unchanged."""
  _one_of(c, "stage", ("pretrain", "finetune"))
  for key in ("model.d_model", "model.n_layers", "model.head_dim", "model.seq_len", "model.vocab_size",
              "model.mlp_ratio", "model.rope_base", "model.norm_eps", "optim.batch_size", "eval.batch_size",
              "eval.every_tokens", "eval.tokens", "checkpoint.every_steps", "checkpoint.keep_last",
              "log.every_steps", "train.microbatches"):
    _positive(c, key)
  for key in ("optim.lr", "optim.warmup_tokens", "optim.weight_decay", "optim.eps", "optim.grad_clip",
              "optim.b1_half_life_tokens", "optim.b2_half_life_tokens", "stop.target_loss",
              "stop.early_stop_evals", "checkpoint.every_minutes", "checkpoint.keep_every_steps",
              "data.mix_fraction", "replay.coeff", "replay.batch_size", "lora.rank", "replay.top_k",
              "eval.every_steps", "eval.valid_rows", "eval.replay_rows", "eval.mcq_limit", "replay.max_tokens",
              *(f"stop.{k}" for k in LENGTH_KEYS)):
    _positive(c, key, allow_zero=True)
  _validate_model(c)
  _validate_stop(c)
  _validate_data(c)
  _validate_replay(c)
  return c


def _validate_model(c):
  m = c.model
  if m.d_model % m.head_dim:
    raise ConfigError(f"config.model.d_model={m.d_model} is not divisible by config.model.head_dim={m.head_dim}: "
                      "choose a d_model that is a multiple of head_dim.")
  if m.head_dim % 2:
    raise ConfigError(f"config.model.head_dim={m.head_dim} must be even for rotary embeddings.")
  if m.vocab_size <= NUM_RESERVED_IDS:
    raise ConfigError(f"config.model.vocab_size={m.vocab_size} must exceed the {NUM_RESERVED_IDS} reserved ids.")
  _one_of(c, "model.compute_dtype", ("auto", "float32", "bfloat16"))
  _one_of(c, "model.param_count", ("paper", "true"))
  if m.path and c.init["from"]:
    raise ConfigError("Both config.model.path and config.init.from name the weights to start from: keep one.")
  if c.export.hf and not m.path:
    raise ConfigError("config.export.hf writes a Hugging Face checkpoint of a config.model.path model: set "
                      "model.path, or export.hf=False.")
  o = c.optim
  _fraction(c, "optim.b1")
  _fraction(c, "optim.b2")
  _one_of(c, "optim.schedule", SCHEDULES)
  _fraction(c, "optim.decay_fraction", "(0, 1]")
  for key, n in (("optim.batch_size", o.batch_size), ("replay.batch_size", c.replay.batch_size)):
    if n % c.train.microbatches:
      raise ConfigError(f"config.train.microbatches={c.train.microbatches} does not divide config.{key}={n}: "
                        "choose a divisor.")
  mesh = c.mesh
  for axis in ("data", "fsdp", "tensor"):
    if mesh[axis] == 0 or mesh[axis] < -1:
      raise ConfigError(f"config.mesh.{axis}={mesh[axis]} must be a positive device count or -1.")
  if not m.path and (m.d_model // m.head_dim) % max(mesh.tensor, 1):
    raise ConfigError(f"config.mesh.tensor={mesh.tensor} does not divide the {m.d_model // m.head_dim} heads: "
                      "choose a tensor size that divides d_model / head_dim.")


def target_mode(c) -> str:
  """'max' or 'min': whether stop.target_metric must rise to stop.target or fall to it."""
  s = c.stop
  if s.get("target_mode", "auto") != "auto":
    return s.target_mode
  name = s.get("target_metric", "")
  return "max" if "acc" in name or name.startswith("mcq") else "min"


def _validate_stop(c):
  s = c.stop
  _one_of(c, "stop.target_mode", ("auto", "max", "min"))
  if bool(s.target_metric) != bool(s.target):
    raise ConfigError("config.stop.target_metric and config.stop.target go together: set both (e.g. "
                      "target_metric='acc_add', target=0.99) or neither.")
  lengths = [k for k in LENGTH_KEYS if s[k]]
  if len(lengths) > 1:
    raise ConfigError("Two training-length criteria are set (" + ", ".join(f"config.stop.{k}" for k in lengths)
                      + "): keep exactly one and set the others to 0.")
  if not lengths and not s.target_loss and not s.early_stop_evals and not s.target_metric:
    raise ConfigError("No stopping criterion is set: set one of " + ", ".join(f"config.stop.{k}" for k in LENGTH_KEYS)
                      + " (or stop.target_loss / stop.target_metric / stop.early_stop_evals).")


def mcq_benchmarks(c) -> dict:
  """config.eval.mcq as {name: path}."""
  out = {}
  for part in filter(None, (p.strip() for p in c.eval.mcq.split(","))):
    name, sep, path = part.partition(":")
    if not sep or not name or not path:
      raise ConfigError(f"config.eval.mcq entry {part!r} is not NAME:PATH: write e.g. "
                        "'mmlu:data/mmlu.jsonl,arc:data/arc.jsonl'.")
    out[name] = path
  return out


def _validate_data(c):
  d = c.data
  _one_of(c, "data.kind", ("tokens", "chat"))  # a token directory, or JSON lines
  if d.kind == "chat":
    if not c.model.path:
      raise ConfigError("config.data.kind='chat' is read by a Hugging Face model's tokenizer: set config.model.path "
                        "to its checkpoint directory.")
    if not d.train:
      raise ConfigError("config.data.train is empty: set it to a JSON-lines file of prompt/response pairs.")
    _one_of(c, "data.long", ("truncate", "drop"))
  elif c.model.path:
    raise ConfigError("A config.model.path model is finetuned on chat data: set config.data.kind='chat'.")
  _fraction(c, "data.valid_fraction")
  _fraction(c, "data.mix_fraction")
  if d.mix_fraction and not d.mix_path:
    raise ConfigError("config.data.mix_fraction > 0 needs config.data.mix_path: name the dataset to mix in.")
  if mcq_benchmarks(c) and not c.model.path:
    raise ConfigError("config.eval.mcq scores chat-formatted questions: it needs a config.model.path model.")


def _validate_replay(c):
  for key in ("data.dataset_id", "replay.dataset_id"):
    v = c[key]
    if v != -1 and not 0 <= v < NUM_RESERVED_IDS:
      raise ConfigError(f"config.{key}={v} is outside the tokenizer's reserved ids 0–{NUM_RESERVED_IDS - 1}: "
                        f"use one of them, or -1 to take it from the data's metadata.")
  r = c.replay
  for part in filter(None, str(r.prompt_ids).split(",")):
    if not part.strip().isdigit() or int(part) >= NUM_RESERVED_IDS:
      raise ConfigError(f"config.replay.prompt_ids={r.prompt_ids!r} must list reserved ids 0–{NUM_RESERVED_IDS - 1} "
                        "separated by commas, e.g. '0,1,2'.")
  _one_of(c, "replay.method", REPLAY_METHODS)
  _one_of(c, "replay.source", REPLAY_SOURCES)
  teacher = r.get("teacher", "auto")  # absent from configs stored before the key existed (a sweep's runs)
  _one_of(c, "replay.teacher", REPLAY_TEACHERS, teacher)
  if teacher == "sampled" and (r.method != "kl" or r.source != "self"):
    raise ConfigError(f"config.replay.teacher='sampled' keeps the frozen model's logits from sampling, which only "
                      f"replay.method='kl' with replay.source='self' uses (here method={r.method!r}, source="
                      f"{r.source!r}): set config.replay.teacher to 'auto' or 'forward'.")
  if r.method == "replace" and not 0.0 < r.coeff < 1.0:
    raise ConfigError(f"config.replay.coeff={r.coeff} is the fraction of rows replaced for method 'replace': "
                      "it must lie in (0, 1).")
  if r.temperature < 0:
    raise ConfigError(f"config.replay.temperature={r.temperature} must be ≥ 0 (0 = greedy).")
  _fraction(c, "replay.top_p", "(0, 1]")
  _positive(c, "replay.buffer")
  if c.model.path and r.method not in ("none", "kl", "ntp"):
    raise ConfigError(f"config.replay.method={r.method!r} is for token data: a chat run uses 'none', 'kl' or 'ntp'.")
  if c.model.path and r.method != "none" and r.source == "real" and not r.path:
    raise ConfigError("config.replay.source='real' needs config.replay.path: a JSON-lines file of {\"text\": ...}.")
  needs_pretrained = r.method != "none" or c.lora.rank > 0
  if needs_pretrained and not c.init["from"] and not c.model.path:
    raise ConfigError(f"config.replay.method={r.method!r} / config.lora.rank={c.lora.rank} needs a pretrained run "
                      "to start from: set config.init.from to its workdir (or config.model.path to a Hugging Face "
                      "checkpoint).")
  if c.stage == "finetune" and not c.init["from"] and not c.model.path:
    raise ConfigError("config.stage='finetune' needs config.init.from: set it to the pretraining run's workdir (or "
                      "config.model.path to a Hugging Face checkpoint).")


def weight_model_keys(parent_model: dict) -> list[str]:
  """The model keys a finetuning run takes from the run it starts from (what the weights depend on)."""
  return [k for k in parent_model if k not in RUN_MODEL_KEYS]


def inherit_model_shape(c: ml_collections.ConfigDict, parent_config: dict, explicit=()) -> list[str]:
  """Sets c's model keys that the parent's weights depend on to the parent's values (keys c's schema lacks are
  skipped); returns those of `explicit` (keys like 'd_model' the user set) whose value contradicts the parent."""
  parent_model = parent_config.get("model", {})
  conflicts = [k for k in explicit if k in parent_model and k in weight_model_keys(parent_model)
               and k in c.model and c.model[k] != parent_model[k]]
  for k in weight_model_keys(parent_model):
    if k in c.model and k not in conflicts:
      c.model[k] = type(c.model[k])(parent_model[k]) if isinstance(c.model[k], float) else parent_model[k]
  return conflicts


def replay_teacher(c: ml_collections.ConfigDict, data_parallel_devices: int = 1) -> str:
  """Where KL replay's teacher logits come from: 'sampled' (kept from sampling) or 'forward' (π_pre run on each
  replay batch; also the answer for every method that needs no sampled logits).

  'auto' picks 'sampled' for kl on self-generated rows when the kept logits, buffer × rows × T × V fp32, take
  ≤ 1 GiB per device: they are sharded over the data-parallel devices (data × fsdp; replicated over tensor).
  """
  r = c.replay
  teacher = r.get("teacher", "auto")  # absent from configs stored before the key existed
  if r.method != "kl" or r.source != "self" or teacher == "forward":
    return "forward"
  if teacher == "sampled":
    return "sampled"
  rows = r.batch_size or c.optim.batch_size
  per_device = r.buffer * rows * c.model.seq_len * c.model.vocab_size * 4 / max(1, data_parallel_devices)
  return "sampled" if per_device <= SAMPLED_TEACHER_MAX_BYTES else "forward"


def compute_dtype_name(c: ml_collections.ConfigDict, platform: str) -> str:
  if c.model.compute_dtype != "auto":
    return c.model.compute_dtype
  return platform_lib.choices(platform).compute_dtype


def tokens_per_step(c: ml_collections.ConfigDict) -> int:
  return c.optim.batch_size * c.model.seq_len


def from_json_file(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(io.read_json(path))  # path may be a URL


def write(c: ml_collections.ConfigDict, workdir: str):
  """Writes the resolved config atomically as workdir/config.json."""
  io.makedirs(workdir)
  write_json(rundir.config_file(workdir), c.to_dict(), sort_keys=True)


def check_workdir(c: ml_collections.ConfigDict, workdir: str):
  """Refuses a workdir that holds a different run, before anything is written."""
  path = rundir.config_file(workdir)
  if not io.exists(path):
    return
  diff = differences(from_json_file(path), c)
  if diff:
    raise ConfigError(f"The workdir {workdir} holds a run with a different config ({', '.join(diff[:5])} differ): "
                      "use a new --workdir, or the same config to resume it.")


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                ignore=("log", "checkpoint", "mesh", "data.num_workers", "data.prefetch")) -> list[str]:
  """Dotted keys whose values differ, ignoring keys that do not change the numbers (a run may resume on
  another mesh) and treating a key missing from either side (a config written before it existed) as its
  default."""
  base = flatten(default().to_dict())
  fa, fb = {**base, **flatten(a.to_dict())}, {**base, **flatten(b.to_dict())}
  keys = sorted(set(fa) | set(fb))
  return [k for k in keys if fa.get(k) != fb.get(k)
          and not any(k == i or k.startswith(i + ".") for i in ignore)
          and not (isinstance(fa.get(k), float) and isinstance(fb.get(k), float) and math.isclose(fa[k], fb[k]))]


def flatten(d: dict, prefix: str = "") -> dict:
  """{"a.b": v} for the nested {"a": {"b": v}}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out
