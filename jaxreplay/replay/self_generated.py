"""Self-generated replay: rows sampled from the frozen pretrained model, prompted only by the dataset-id token.

With `replay.prompt_ids` (e.g. '0,1,2', the earlier tasks of the toy continual experiment) the rows of every
batch are split evenly among those ids instead.

A refill samples `buffer` batches at once; each row is used once, in order. Refill r is drawn with a key derived
from (seed, r) alone, so the rows for step s are a pure function of the config and the checkpoint: a resumed
run regenerates exactly the rows an uninterrupted one used.

With `replay.cache_dir` the refills are stored on disk under a directory named by a fingerprint of everything
that determines them (the checkpoint's export and weights, the model, the sampling settings, seed, row length,
batch rows, buffer). Every run of a sweep that starts from the same checkpoint with the same settings then
reads the samples instead of drawing them again. `fingerprint.json` in that directory is compared on every
use; a cache made by another checkpoint or other settings is an error, never reused. The cache may be a URL
(gs://...): every refill is then one object, written whole; runs that need the same refill at once each sample
it (there is no flock on an object store), which costs time but not correctness, since they write equal bytes.

For KL replay with `replay.teacher` resolving to 'sampled' (`config.replay_teacher`), each refill also keeps the
frozen model's logits from sampling, [buffer, rows, T, V] fp32 on the mesh, so that the train step needs no
forward pass of the frozen model. The disk cache holds tokens only: a refill read from it gets its logits from
one forward pass of the frozen model over the buffer at refill time (equal to the sampled ones up to rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _bytes_io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreplay import io
from jaxreplay.io import atomic_open, file_lock, write_json
from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib
from jaxreplay import rundir, sharding
from jaxreplay.models import decoder, export as export_lib, sampler

FORMAT = 1
_KEY_TAG = 0x5E1F  # separates the replay key stream from every other use of the seed
FINGERPRINT = "fingerprint.json"


def paper_prompt_id(c, pretraining_dataset_id: int) -> int:
  """The paper's prompt: config.replay.dataset_id, or (when -1) the pretraining data's id; a reserved id."""
  dataset_id = c.replay.dataset_id if c.replay.dataset_id >= 0 else pretraining_dataset_id
  if not 0 <= dataset_id < config_lib.NUM_RESERVED_IDS:
    raise ConfigError(
        f"The self-generated replay prompt id {dataset_id} (config.replay.dataset_id, or the pretraining data's "
        f"dataset_id when that is -1) is outside the tokenizer's reserved ids 0–{config_lib.NUM_RESERVED_IDS - 1}: "
        "set config.replay.dataset_id to the id the model was pretrained with.")
  return int(dataset_id)


def prompt_ids(c) -> tuple[int, ...]:
  """config.replay.prompt_ids as ids ('0,1,2' -> (0, 1, 2)); () when unset (the single dataset id is used)."""
  return tuple(int(p) for p in str(c.replay.prompt_ids).split(",") if p.strip())


def refill_key(seed: int, refill: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _KEY_TAG), refill)


def _sha256_file(path: str) -> str:
  return hashlib.sha256(io.read_bytes(path)).hexdigest()


def checkpoint_fingerprint(weights_dir: str, frozen) -> dict:
  """What identifies the weights samples come from: a run's export info and config (or a Hugging Face
  checkpoint's config.json), and checksums of the weights themselves (integer sums, the same on any mesh)."""
  export_config = io.join(rundir.export_dir(weights_dir), "config.json")
  if io.exists(export_config):
    info, config_path = export_lib.exported_info(weights_dir), export_config
  else:  # a Hugging Face checkpoint directory (config.model.path)
    info, config_path = {}, io.join(weights_dir, "config.json")
  arrays = export_lib.integrity_record(frozen)["arrays"]
  return dict(info=info, config_sha256=_sha256_file(config_path),
              params_sha256=hashlib.sha256(json.dumps(arrays, sort_keys=True).encode()).hexdigest())


class DiskCache:
  """Refills stored as .npy files (int32 [buffer·rows, T], in sampling order) in one fingerprinted directory."""

  def __init__(self, cache_dir: str, fingerprint: dict):
    self.fingerprint = fingerprint
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
    one_cache = io.exists(io.join(cache_dir, FINGERPRINT))  # pointed at one cache, not the cache root
    self.directory = cache_dir if one_cache else io.join(cache_dir, digest)
    if jax.process_index() == 0:
      io.makedirs(self.directory)
      if not io.exists(io.join(self.directory, FINGERPRINT)):
        write_json(io.join(self.directory, FINGERPRINT), fingerprint, sort_keys=True)
    self.verify()

  def verify(self):
    path = io.join(self.directory, FINGERPRINT)
    for _ in range(50):  # another process may be about to write it
      if io.exists(path):
        break
      time.sleep(0.1)
    try:
      stored = io.read_json(path)
    except (OSError, ValueError) as e:
      raise ConfigError(f"The replay cache {self.directory} has no readable {FINGERPRINT} ({e}): "
                                   "delete that directory so that it is sampled again.") from None
    fa, fb = config_lib.flatten(stored), config_lib.flatten(self.fingerprint)
    diff = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    if diff:
      raise ConfigError(
          f"The replay cache {self.directory} was made by another checkpoint or other sampling settings "
          f"({', '.join(diff[:4])} differ{'s' if len(diff) == 1 else ''}): point config.replay.cache_dir at the "
          "cache root (or another directory) so that a fresh cache is made; it is never reused.")

  def path(self, refill: int) -> str:
    return io.join(self.directory, f"refill_{refill:06d}.npy")

  def lock(self, refill: int):
    """Held while one process samples a refill, so concurrent runs of a sweep wait and read it instead (on a
    local or shared disk; an object store has no flock)."""
    if io.is_url(self.directory):
      return contextlib.nullcontext()
    return file_lock(io.join(self.directory, f"refill_{refill:06d}.lock"))

  def read(self, refill: int, shape, vocab_size: int) -> np.ndarray | None:
    path = self.path(refill)
    if not io.exists(path):
      return None
    try:
      tokens = np.load(_bytes_io.BytesIO(io.read_bytes(path)), allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ConfigError(f"The cached replay samples {path} cannot be read ({e}): delete the file "
                                   "so that it is sampled again.") from None
    if tokens.shape != tuple(shape) or tokens.dtype != np.int32 or tokens.min() < 0 or tokens.max() >= vocab_size:
      raise ConfigError(f"The cached replay samples {path} hold {tokens.dtype} {tokens.shape} tokens, "
                                   f"not int32 {tuple(shape)} ids below {vocab_size}: delete the file so that it "
                                   "is sampled again.")
    return tokens

  def write(self, refill: int, tokens: np.ndarray):
    """Written whole under a temporary name, then renamed: readers never see a partial file, and two runs that
    write the same refill write the same bytes."""
    with atomic_open(self.path(refill), "wb") as f:
      np.save(f, np.ascontiguousarray(tokens, np.int32), allow_pickle=False)


class SelfGeneratedReplay:
  """Replay rows sampled from the frozen pretrained model; `next(step)` -> (tokens [rows, T] int32, teacher
  logits [rows, T, V] fp32 or None) on the mesh, the logits when `teacher` is 'sampled'."""

  def __init__(self, c, mesh, model_cfg, frozen, prompt_id: int, weights_dir: str):
    """`prompt_id`: the token every row starts from (the paper's dataset id; a chat model's BOS);
    `weights_dir`: where `frozen` was read from (a run's workdir or a Hugging Face directory), fingerprinted
    for the disk cache."""
    if frozen is None:
      raise ConfigError("Self-generated replay samples from a pretrained model: set config.init.from "
                                   "to the workdir of a finished pretraining run.")
    self.mesh = mesh
    self.model_cfg = model_cfg
    self.frozen = frozen
    self.weights_dir = weights_dir
    self.seed = int(c.seed)
    self.rows = int(c.replay.batch_size or c.optim.batch_size)
    self.buffer = int(c.replay.buffer)
    self.T = int(c.model.seq_len)
    self.dataset_id = int(prompt_id)
    self.prompt_ids = prompt_ids(c)  # several prompt ids: each batch's rows split evenly among them
    div = sharding.batch_divisor(self.mesh)
    if self.rows % div:
      raise ConfigError(f"config.replay.batch_size={self.rows} replay rows are not divisible by the "
                                   f"{div} data-parallel devices: choose a multiple of mesh.data × mesh.fsdp.")
    self.sc = sampler.SamplingConfig(temperature=float(c.replay.temperature), top_k=int(c.replay.top_k),
                                     top_p=float(c.replay.top_p))
    # 'sampled': keep the frozen model's logits from sampling
    self.sampled_teacher = config_lib.replay_teacher(c, div) == "sampled"
    self.sampler = sampler.make_sampler(self.model_cfg, self.sc, self.buffer * self.rows, 1, self.T, self.mesh,
                                        return_logits=self.sampled_teacher)
    self.cache = None
    if c.replay.cache_dir:
      self.cache = DiskCache(c.replay.cache_dir, self.fingerprint(c))
    self._buffer_sh = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES, None))
    self._arrange = jax.jit(lambda x: x.reshape(self.buffer, self.rows, self.T), out_shardings=self._buffer_sh)
    self._take = jax.jit(lambda buf, j: buf[j], out_shardings=sharding.batch_sharding(self.mesh))
    if self.sampled_teacher:
      logits_sh = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES, None, None))
      V = self.model_cfg.vocab_size
      self._arrange_logits = jax.jit(lambda x: x.reshape(self.buffer, self.rows, self.T, V),
                                     out_shardings=logits_sh, donate_argnums=0)
      self._forward = jax.jit(  # teacher logits for rows read from the disk cache, one batch at a time
          lambda p, buf: jax.lax.map(lambda t: decoder.logits(self.model_cfg, p, t), buf), out_shardings=logits_sh)
      self._take_logits = jax.jit(lambda buf, j: buf[j], out_shardings=sharding.batch_sharding(self.mesh, 3))
    self._refill, self._tokens, self._logits = None, None, None
    self.sampled_refills = 0  # refills this process drew itself (the rest came from the disk cache)

  def fingerprint(self, c) -> dict:
    m = self.model_cfg
    return dict(
        format=FORMAT,
        checkpoint=checkpoint_fingerprint(self.weights_dir, self.frozen),
        model=dict(d_model=m.d_model, n_layers=m.n_layers, head_dim=m.head_dim, vocab_size=m.vocab_size,
                   mlp_ratio=m.mlp_ratio, rope_base=m.rope_base, norm_eps=m.norm_eps,
                   compute_dtype=jnp.dtype(m.dtype).name,
                   # the other families' fields, only for them: the paper model's caches keep their fingerprint
                   **({} if m.family == "paper" else dict(family=m.family, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                                          d_mlp=m.d_mlp, mlp=m.mlp))),
        sampling=dict(temperature=self.sc.temperature, top_k=self.sc.top_k, top_p=self.sc.top_p,
                      dataset_id=self.dataset_id, eos_id=-1,
                      # only when set, so that caches made with one prompt id keep their fingerprint
                      **({"prompt_ids": list(self.prompt_ids)} if self.prompt_ids else {})),
        seed=self.seed, seq_len=self.T, rows=self.rows, buffer=self.buffer, platform=jax.default_backend())

  def _prompt_ids(self) -> np.ndarray:
    """The prompt id of each sampled row, [buffer·rows]: with several ids, row i of every batch gets id
    number ⌊i·k/rows⌋ of the k ids (shares differ by at most one row when k ∤ rows)."""
    if not self.prompt_ids:
      return np.full(self.buffer * self.rows, self.dataset_id, np.int32)
    k = len(self.prompt_ids)
    per_batch = np.asarray(self.prompt_ids, np.int32)[np.arange(self.rows) * k // self.rows]
    return np.tile(per_batch, self.buffer)

  def _sample(self, refill: int):
    """Refill r sampled: tokens [buffer·rows, T] (and their logits [buffer·rows, T, V] for a sampled teacher)."""
    prompt = self._prompt_ids()[:, None]
    prompt = jax.make_array_from_callback(prompt.shape, sharding.batch_sharding(self.mesh), lambda i: prompt[i])
    self.sampled_refills += 1
    return self.sampler(self.frozen, prompt, refill_key(self.seed, refill))

  def _arranged(self, sampled):
    """The sampler's output as (tokens [buffer, rows, T], logits [buffer, rows, T, V] or None)."""
    if self.sampled_teacher:
      return self._arrange(sampled[0]), self._arrange_logits(sampled[1])
    return self._arrange(sampled), None

  def _cached(self, refill: int):
    """Refill r from the disk cache as `_load` returns it (the teacher logits, if 'sampled', computed now), or
    None when it is not there. Process 0 looks; every process agrees on the answer, then each reads the rows."""
    shape, V = (self.buffer * self.rows, self.T), self.model_cfg.vocab_size
    cached = self.cache.read(refill, shape, V) if jax.process_index() == 0 else None
    if not export_lib.agree(cached is not None):
      return None
    host = (cached if cached is not None else self.cache.read(refill, shape, V)).reshape(self.buffer, self.rows, -1)
    tokens = jax.make_array_from_callback(host.shape, self._buffer_sh, lambda i: host[i])
    return tokens, (self._forward(self.frozen, tokens) if self.sampled_teacher else None)

  def _load(self, refill: int):
    """Refill r as (tokens [buffer, rows, T], teacher logits [buffer, rows, T, V] or None) on the mesh: from the
    disk cache, or sampled (and then cached)."""
    if self.cache is None:
      return self._arranged(self._sample(refill))
    hit = self._cached(refill)
    if hit is not None:
      return hit
    lock = self.cache.lock(refill) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
      hit = self._cached(refill)  # another run may have written it while this one waited for the lock
      if hit is not None:
        return hit
      sampled = self._sample(refill)
      tokens = sampled[0] if self.sampled_teacher else sampled
      many = jax.process_count() > 1
      host = np.asarray(multihost_utils.process_allgather(tokens, tiled=True) if many else tokens)
      if jax.process_index() == 0:
        self.cache.write(refill, host)
    return self._arranged(sampled)

  def next(self, step: int):
    """(rows, teacher logits or None) for optimizer step `step`: row block step mod buffer of refill step // buffer."""
    refill, j = divmod(int(step), self.buffer)
    if refill != self._refill:
      self._tokens = self._logits = None  # free the old buffers before the new ones are made
      (self._tokens, self._logits), self._refill = self._load(refill), refill
    teacher = self._take_logits(self._logits, j) if self._logits is not None else None
    return self._take(self._tokens, j), teacher
