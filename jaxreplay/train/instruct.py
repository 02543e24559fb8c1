"""Finetuning a pretrained Hugging Face instruct model (Llama/Qwen) on chat data, with replay against forgetting.

The paper's largest experiment (digest §3 D): Llama-3.2-1B-Instruct finetuned on Verilog chat data with loss
on the assistant tokens only; replay rows are either real text (a {"text": ...} JSON-lines file, packed) or
self-generated: sampled from the *frozen* instruct model from the BOS token alone, temperature 1, the full
row length, no EOS stop (no chat template: models are not trained on prompts). Replay enters through the KL
penalty KL(π_pre ‖ π_θ) or as next-token loss, times `replay.coeff`. Evaluations: masked loss and next-token
accuracy on held-out assistant tokens, loss/KL on held-out replay rows, and multiple-choice accuracies.

The pieces are the framework's: `optim` (AdamW, schedules), `losses`, `sharding`, `checkpoint`
(resumable state), `metrics` (JSONL). Data order and replay rows are pure functions of the step, so a
resumed run equals an uninterrupted one. Run it with

  python -m jaxreplay.train.instruct --config=sweeps/instruct.py:small --workdir=runs/instruct_small   # one run
  jaxreplay sweep sweeps/instruct.py:small --workdir=runs/instruct_sweep                         # every arm

In a sweep, a stage whose base config has stage='instruct' (this module's `default()`) is validated by
`validate` and trained by `run` (jaxreplay/runner.py); `run` writes final.json last, as `train.run` does.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxreplay import config as config_lib, sharding
from jaxreplay.data import chat as chat_data
from jaxreplay.errors import TrainingError, UserError
from jaxreplay.evals import mcq
from jaxreplay.train import optim
from jaxreplay.models import decoder, hf_import, sampler
from jaxreplay.train import preemption as preemption_lib
from jaxreplay.train.instruct_steps import (RealReplay, SelfReplay, local_rows, make_eval_step, make_objective,  # noqa: F401
                                      make_replay_eval_step, make_train_step, sample_bos)

METHODS = ("none", "kl", "ntp")
DONE_FILE = "final.json"


def default() -> ml_collections.ConfigDict:
  base = config_lib.default()
  c = ml_collections.ConfigDict()
  c.stage = "instruct"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      path="",  # local Hugging Face checkpoint directory (or a hub id, where the hub can be reached)
      seq_len=512, compute_dtype="auto", remat=False, scan_unroll=0))
  c.data = ml_collections.ConfigDict(dict(
      train="",  # JSON lines with prompt/response (or messages)
      valid="",  # held-out JSON lines; empty = hold out valid_fraction of train
      valid_fraction=0.05, prompt_key="prompt", response_key="response", prompt_template="{prompt}",
      system="", long="truncate",
      cache_dir=""))  # where tokenized data is cached across runs; empty = beside the data file
  c.optim = ml_collections.ConfigDict(base.optim.to_dict())
  c.optim.update(lr=1e-5, b2=0.997, batch_size=128)
  c.train = ml_collections.ConfigDict(dict(microbatches=1))  # gradient accumulation within a step
  c.stop = ml_collections.ConfigDict(dict(epochs=5.0, steps=0))
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=100, at_start=True, batch_size=16, valid_rows=256, replay_rows=64,
      mcq="",  # name:path[,name:path...] benchmark JSON lines
      mcq_limit=0, mcq_seed=42))
  c.replay = ml_collections.ConfigDict(dict(
      method="none", source="self", coeff=1.0, batch_size=32,
      buffer=32,  # self-generated rows sampled per refill (a multiple of batch_size)
      temperature=1.0, top_k=0,
      path="", text_key="text", max_tokens=0))  # real replay: text JSON lines, read up to max_tokens (0: all)
  c.checkpoint = ml_collections.ConfigDict(base.checkpoint.to_dict())
  c.log = ml_collections.ConfigDict(base.log.to_dict())
  c.mesh = ml_collections.ConfigDict(base.mesh.to_dict())
  c.export = ml_collections.ConfigDict(dict(hf=True))  # write WORKDIR/hf: safetensors + config + tokenizer
  c.lock()
  return c


def validate(c) -> ml_collections.ConfigDict:
  err = config_lib.ConfigError
  if not c.model.path:
    raise err("config.model.path is empty: set it to a Hugging Face checkpoint directory (config.json, "
              "*.safetensors, tokenizer files).")
  if not c.data.train:
    raise err("config.data.train is empty: set it to a JSON-lines file of prompt/response pairs.")
  for key in ("model.seq_len", "optim.batch_size", "eval.batch_size", "eval.every_steps", "train.microbatches",
              "checkpoint.every_steps", "log.every_steps"):
    config_lib._positive(c, key)
  for key in ("optim.lr", "optim.warmup_tokens", "optim.weight_decay", "replay.coeff", "stop.epochs", "stop.steps",
              "replay.top_k", "replay.max_tokens"):
    config_lib._positive(c, key, allow_zero=True)
  if bool(c.stop.epochs) == bool(c.stop.steps):
    raise err("Set exactly one of config.stop.epochs and config.stop.steps (the other 0).")
  if c.optim.batch_size % c.train.microbatches:
    raise err(f"config.train.microbatches={c.train.microbatches} does not divide config.optim.batch_size="
              f"{c.optim.batch_size}: choose a divisor.")
  r = c.replay
  if r.method not in METHODS:
    raise err(f"config.replay.method={r.method!r}: use one of {', '.join(METHODS)}.")
  if r.source not in config_lib.REPLAY_SOURCES:
    raise err(f"config.replay.source={r.source!r}: use 'real' or 'self'.")
  if r.method != "none":
    config_lib._positive(c, "replay.batch_size")
    if r.batch_size % c.train.microbatches:
      raise err(f"config.replay.batch_size={r.batch_size} is not divisible by config.train.microbatches="
                f"{c.train.microbatches}.")
    if r.source == "self" and (r.buffer <= 0 or r.buffer % r.batch_size):
      raise err(f"config.replay.buffer={r.buffer} must be a positive multiple of config.replay.batch_size="
                f"{r.batch_size}.")
    if r.source == "real" and not r.path:
      raise err("config.replay.source='real' needs config.replay.path: a JSON-lines file of {\"text\": ...}.")
  if r.temperature < 0:
    raise err(f"config.replay.temperature={r.temperature} must be ≥ 0 (0 = greedy).")
  if c.model.compute_dtype not in ("auto", "float32", "bfloat16"):
    raise err(f"config.model.compute_dtype={c.model.compute_dtype!r}: use 'auto', 'float32' or 'bfloat16'.")
  benchmarks(c)
  return c


def benchmarks(c) -> dict:
  out = {}
  for part in filter(None, (p.strip() for p in c.eval.mcq.split(","))):
    name, sep, path = part.partition(":")
    if not sep or not name or not path:
      raise config_lib.ConfigError(f"config.eval.mcq entry {part!r} is not NAME:PATH: write e.g. "
                                   "'mmlu:data/mmlu.jsonl,arc:data/arc.jsonl'.")
    out[name] = path
  return out


# ---------------------------------------------------------------------------------------------------- run

def _put(batch: dict, mesh):
  """A global batch from this process's rows."""
  return {k: sharding.put_batch(v, mesh) for k, v in batch.items()}


def _split_examples(c, tokenizer):
  d = c.data
  read = lambda p: chat_data.read_jsonl(p, d.prompt_key, d.response_key, d.prompt_template, d.system)
  train = read(d.train)
  if d.valid:
    return train, read(d.valid)
  n_valid = int(round(d.valid_fraction * len(train)))
  if n_valid == 0:
    return train, []
  order = np.random.default_rng([c.seed, 1]).permutation(len(train))
  return [train[i] for i in order[n_valid:]], [train[i] for i in order[:n_valid]]


class Run:
  """Everything one instruct finetuning run needs, resolved before the first step."""

  def __init__(self, c, workdir: str):
    validate(c)
    self.c, self.workdir = c, workdir
    self.mesh = sharding.make_mesh(c.mesh)
    platform = jax.default_backend()
    dtype = c.model.compute_dtype
    if dtype == "auto":
      dtype = "float32" if platform == "cpu" else "bfloat16"
    self.directory = hf_import.resolve(c.model.path)
    hf = hf_import.read_config(self.directory)
    unroll = c.model.scan_unroll or (hf["num_hidden_layers"] if platform == "cpu" else 1)
    self.cfg = hf_import.config_from_hf(hf, c.model.seq_len, dtype, c.model.remat, unroll)
    self.tokenizer = chat_data.load_tokenizer(self.directory)
    if len(self.tokenizer) > self.cfg.vocab_size:
      raise config_lib.ConfigError(f"The tokenizer in {self.directory} has {len(self.tokenizer)} tokens but the model "
                                   f"only {self.cfg.vocab_size}: use the checkpoint's own tokenizer.")
    pad = self.tokenizer.pad_token_id
    self.pad_id = pad if pad is not None else max(self.cfg.pad_id, 0)
    bos = self.tokenizer.bos_token_id
    self.bos_id = bos if bos is not None else self.cfg.bos_id

    T, B = c.model.seq_len, c.optim.batch_size
    div = sharding.batch_divisor(self.mesh) * c.train.microbatches
    for key, n in (("optim.batch_size", B), ("replay.batch_size", c.replay.batch_size)):
      if n % div and (key == "optim.batch_size" or c.replay.method != "none"):
        raise config_lib.ConfigError(f"config.{key}={n} is not divisible by the {div} data-parallel devices × "
                                     "microbatches: choose a multiple.")
    def chat():
      train_ex, valid_ex = _split_examples(c, self.tokenizer)
      enc = lambda exs: [chat_data.encode_chat(self.tokenizer, m) for m in exs]
      train = chat_data.pack(enc(train_ex), T, self.pad_id, c.data.long)
      valid = chat_data.pack(enc(valid_ex), T, self.pad_id, c.data.long) if valid_ex else None
      return train, valid

    d = c.data
    self.train, self.valid = _cached(c, "chat", [d.train, d.valid, d.valid_fraction, d.prompt_key, d.response_key,
                                                 d.prompt_template, d.system, d.long, T, c.seed], chat)
    arrays = lambda p: dict(tokens=p.tokens, mask=p.mask, segments=p.segments)
    self.batches = chat_data.Batches(arrays(self.train), B, c.seed)
    self.tokens_per_step = B * T
    self.total_steps = int(c.stop.steps) or max(1, int(round(c.stop.epochs * len(self.train) / B)))
    self.replay_rows = self.replay_probe = None
    if c.replay.path and (c.replay.source == "real" and c.replay.method != "none" or c.eval.replay_rows):
      eos = self.cfg.eos_ids[0] if self.cfg.eos_ids else None  # Llama-3: <|end_of_text|>, not <|eot_id|>
      read = lambda: chat_data.read_text_jsonl(c.replay.path, self.tokenizer, c.replay.text_key, c.replay.max_tokens,
                                               self.bos_id, eos)
      rows = _cached(c, "text", [c.replay.path, c.replay.text_key, c.replay.max_tokens, T],
                     lambda: chat_data.pack_documents(read(), T))
      n_probe = min(c.eval.replay_rows, len(rows) // 2)
      # The last rows are held out as the real forgetting probe; training replay never sees them.
      self.replay_rows = rows[:len(rows) - n_probe]
      self.replay_probe = rows[len(rows) - n_probe:] if n_probe else None
    self.mcq = {name: mcq.read_benchmark(path, c.eval.mcq_limit, c.eval.mcq_seed)
                for name, path in benchmarks(c).items()}


def _cached(c, kind: str, key: list, build):
  """Tokenized data, built once and shared by every run of a sweep (tokenizing 600K chats takes minutes).

  Kept in data.cache_dir (default: beside the data file) under a hash of the inputs: file paths, sizes and
  modification times, the tokenizer files and the settings in `key`."""
  import hashlib
  import pickle
  model_dir = hf_import.resolve(c.model.path)
  stamp = []
  for path in [x for x in key if isinstance(x, str) and os.path.isfile(x)] + sorted(
      os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.startswith(("tokenizer", "special_tokens"))):
    st = os.stat(path)
    stamp.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
  digest = hashlib.sha256(repr((kind, key, stamp)).encode()).hexdigest()[:16]
  source = next(x for x in key if isinstance(x, str) and x)
  directory = c.data.cache_dir or os.path.dirname(os.path.abspath(source))
  path = os.path.join(directory, f".jaxreplay-{kind}-{digest}.pkl")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return pickle.load(f)
  value = build()
  if jax.process_index() == 0:
    import tempfile
    try:  # a temporary name of its own: two jobs of a sweep may build the same cache at once
      fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as f:
          pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
    except OSError:
      pass  # a read-only data directory: tokenize again next time
  return value


def _sums(fn, batches) -> dict:
  total = None
  for out in batches:
    out = jax.device_get(fn(out))
    total = out if total is None else jax.tree.map(np.add, total, out)
  return total


def run(c, workdir: str) -> dict:
  """Runs (or resumes, or returns the result of) one instruct finetuning run; returns its final metrics."""
  from tqdm import tqdm
  from jaxreplay.train import checkpoint as ckpt_lib
  from jaxreplay.train import metrics as metrics_lib
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):  # refuse a workdir that holds a different run, before anything is written
    diff = config_lib.differences(config_lib.from_json_file(config_path), c)
    if diff:
      raise config_lib.ConfigError(f"The workdir {workdir} holds a run with a different config "
                                   f"({', '.join(diff[:5])} differ): use a new --workdir, or the same config to "
                                   "resume it.")
  done = os.path.join(workdir, DONE_FILE)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  r = Run(c, workdir)
  ckpt_lib.check_writable(workdir)
  if jax.process_index() == 0:
    config_lib.write(c, workdir)
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump(dict(train=r.train.stats, valid=r.valid.stats if r.valid else None,
                     total_steps=r.total_steps, replay_rows=None if r.replay_rows is None else len(r.replay_rows)), f,
                indent=2)
  mesh, cfg = r.mesh, r.cfg
  method = c.replay.method
  frozen = hf_import.load_params(r.directory, cfg, mesh)  # π_pre; the trained copy starts equal to it
  param_sh = jax.tree.map(lambda x: x.sharding, frozen)
  lr_schedule = optim.lr_schedule(c, r.total_steps)
  optimizer = optim.make_optimizer(c, r.total_steps)

  def init_fn(params):
    params = jax.tree.map(jnp.copy, params)
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init_fn, frozen)
  state_sh = dict(params=param_sh, opt_state=sharding.param_shardings(abstract["opt_state"], mesh),
                  step=sharding.replicated(mesh))
  state = jax.jit(init_fn, out_shardings=state_sh)(frozen)
  checkpointer = ckpt_lib.Checkpointer(workdir, c.checkpoint)
  extra = dict(elapsed_s=0.0)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, extra = restored
  start = int(jax.device_get(state["step"]))

  key = jax.random.key(c.seed)
  replay = None
  if method != "none":
    if c.replay.source == "self":
      replay = SelfReplay(cfg, frozen, c, mesh, r.bos_id, jax.random.fold_in(key, 1))
    else:
      replay = RealReplay(r.replay_rows, c, mesh)
  # Forgetting probes, the same for every arm: BOS-prompted samples of π_pre ("self") and held-out real replay
  # text ("real"); loss and KL to π_pre on each.
  probes = {}
  if c.eval.replay_rows:
    n = -(-c.eval.replay_rows // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)
    if r.bos_id >= 0:
      samp = sampler.SamplingConfig(temperature=float(c.replay.temperature), top_k=int(c.replay.top_k))
      probes["self"] = sample_bos(cfg, frozen, n, r.bos_id, samp, mesh, jax.random.fold_in(key, 2))
    div = sharding.batch_divisor(mesh)
    m = 0 if r.replay_probe is None else len(r.replay_probe[:n]) // div * div
    if m:
      probes["real"] = sharding.put_batch(local_rows(r.replay_probe[:m]), mesh)

  batch_sh = sharding.batch_sharding(mesh)
  chat_sh = dict(tokens=batch_sh, mask=batch_sh, segments=batch_sh)
  train_step = jax.jit(make_train_step(make_objective(cfg, method, float(c.replay.coeff)), optimizer, lr_schedule,
                                       c.train.microbatches),
                       in_shardings=(state_sh, param_sh, chat_sh, batch_sh if replay else None),
                       out_shardings=(state_sh, None), donate_argnums=(0,))
  eval_chat = jax.jit(make_eval_step(cfg))
  eval_replay_fn = jax.jit(make_replay_eval_step(cfg))

  def evaluate(params) -> dict:
    out = {}
    if r.valid is not None:
      EB = -(-c.eval.batch_size // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)
      n = min(len(r.valid), c.eval.valid_rows or len(r.valid))
      n_pad = -(-n // EB) * EB
      idx = np.arange(n_pad) % len(r.valid)
      weight = (np.arange(n_pad) < n)[:, None]
      rows = dict(tokens=r.valid.tokens[idx], mask=r.valid.mask[idx] & weight, segments=r.valid.segments[idx])
      s = _sums(lambda b: eval_chat(params, _put({k: local_rows(v) for k, v in b.items()}, mesh)),
                ({k: v[i:i + EB] for k, v in rows.items()} for i in range(0, n_pad, EB)))
      out.update(valid_ntp=float(s["nll"] / s["count"]), valid_acc=float(s["correct"] / s["count"]))
    for name, rows_BT in probes.items():
      s = jax.device_get(eval_replay_fn(params, frozen, rows_BT))
      out.update({f"{name}_ntp": float(s["nll"] / s["count"]), f"{name}_kl": float(s["kl"] / s["count"])})
    accs = []
    for name, items in r.mcq.items():
      res = mcq.evaluate(cfg, params, r.tokenizer, items, c.eval.batch_size, mesh, c.data.system)
      out[f"mcq_{name}"] = res["accuracy"]
      accs.append(res["accuracy"])
    if accs:
      out["mcq_mean"] = float(np.mean(accs))
    return out

  writer = metrics_lib.MetricWriter(workdir, c.log, c.to_dict(), resume_step=start)
  bar = tqdm(total=r.total_steps, initial=start, disable=not (c.log.progress and jax.process_index() == 0),
             desc=os.path.basename(os.path.abspath(workdir)), unit="step", dynamic_ncols=True)
  last_eval = {}
  if start == 0 and c.eval.at_start:
    last_eval = evaluate(state["params"])
    writer.write(0, dict(tokens=0, **last_eval))
  wall = time.monotonic() - extra["elapsed_s"]
  step = start
  with preemption_lib.Preemption() as preemption:
    while step < r.total_steps:
      batch = r.batches.batch(step, jax.process_index(), jax.process_count())
      replay_BT = replay.next(step) if replay is not None else None
      state, aux = train_step(state, frozen, _put(batch, mesh), replay_BT)
      step += 1
      bar.update(1)
      extra["elapsed_s"] = time.monotonic() - wall
      row = {}
      if step % c.log.every_steps == 0 or step == r.total_steps or step == 1:
        aux = jax.device_get(aux)
        if not np.isfinite(aux["train_loss"]):
          checkpointer.close()
          raise TrainingError(f"The training loss became {aux['train_loss']} at step {step}: lower optim.lr "
                              f"(now {c.optim.lr}); the last good checkpoint is kept.")
        row.update({k: float(v) for k, v in aux.items()})
      if step % c.eval.every_steps == 0 or step == r.total_steps:
        last_eval = evaluate(state["params"])
        row.update(last_eval)
      if row:
        writer.write(step, dict(tokens=step * r.tokens_per_step, elapsed_s=extra["elapsed_s"], **row))
      if preemption.reached(step):  # SIGTERM (a runner or scheduler stopping this run): save, then exit
        checkpointer.save(step, state, extra, force=True)
        checkpointer.close()
        bar.close()
        writer.close()
        raise SystemExit(f"Preempted (SIGTERM) at step {step}: saved a checkpoint; run the same command to resume.")
      checkpointer.save(step, state, extra)
  bar.close()
  if not last_eval:
    last_eval = evaluate(state["params"])
  checkpointer.save(step, state, extra, force=True)
  checkpointer.close()
  result = dict(step=step, tokens=step * r.tokens_per_step, elapsed_s=extra["elapsed_s"],
                params=decoder.param_counts(cfg)["true"], train_step_compiles=train_step._cache_size(), **last_eval)
  if c.export.hf:
    hf_import.save_hf(state["params"], cfg, r.directory, os.path.join(workdir, "hf"))
  writer.write(step, dict(final=True, **{k: v for k, v in result.items() if k != "step"}))
  writer.close()
  if jax.process_index() == 0:
    with open(done + ".tmp", "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(done + ".tmp", done)
  return result


# ---------------------------------------------------------------------------------------------------- CLI

def _load_file(spec: str, fn: str):
  import importlib.util
  path, _, arg = spec.partition(":")
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  module_spec = importlib.util.spec_from_file_location("jaxreplay_instruct_cfg", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return getattr(module, fn)(arg) if arg else getattr(module, fn)()


def main(argv=None) -> int:
  """`python -m jaxreplay.train.instruct --config=FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]` runs one
  config (the file's get_config). A grid (the file's get_sweep) runs with the sweep runner:
  `jaxreplay sweep FILE.py[:ARG] --workdir=DIR`."""
  import argparse
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m jaxreplay.train.instruct", epilog="a grid of runs: jaxreplay sweep "
                              "sweeps/instruct.py[:small] --workdir=DIR")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  args, rest = p.parse_known_args(argv)
  try:
    c = _load_file(args.config, "get_config")
    for item in rest:
      k, _, v = item.removeprefix("--config.").partition("=")
      node, parts = c, k.split(".")
      for part in parts[:-1]:
        node = node[part]
      old = node[parts[-1]]
      node[parts[-1]] = type(old)(v) if not isinstance(old, bool) else v.lower() in ("1", "true")
    print(json.dumps(run(c, args.workdir), sort_keys=True))
    return 0
  except UserError as e:
    print(f"jaxreplay instruct: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
