"""On-device autoregressive sampling with a preallocated KV cache.

One compiled program per (model, batch, prompt length, length, sampling settings, mesh): the prompt is
prefilled in one forward pass, then a loop over positions inside the same program decodes one token per row
per step, so nothing returns to the host until the whole batch is done. It serves every block type of the
decoder; the KV cache's layout is the platform's (`decode.default_layout`).

Tokens are drawn by inversion: one uniform number per row per step, located in the cumulative sum of the
(unnormalised) probabilities. That is exact, and much cheaper on a CPU than Gumbel noise over the whole
vocabulary. The uniforms for all positions are drawn up front from the key (`uniforms`), so the samples depend
only on the key, never on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreplay import platform as platform_lib
from jaxreplay.errors import SamplingError
from jaxreplay import sharding
from jaxreplay.models import decode
from jaxreplay.models import decoder as dec


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = the whole vocabulary
  top_p: float = 1.0  # 1 = no nucleus truncation
  eos_id: int = -1  # -1 = never stop; otherwise rows that emitted it emit pad_id afterwards
  pad_id: int = 0

  def check(self, vocab_size: int):
    if self.temperature < 0:
      raise SamplingError(f"temperature={self.temperature} must be ≥ 0 (0 = greedy).")
    if not 0 <= self.top_k:
      raise SamplingError(f"top_k={self.top_k} must be ≥ 0 (0 = no top-k truncation).")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"top_p={self.top_p} must lie in (0, 1].")
    for name in ("eos_id", "pad_id"):
      v = getattr(self, name)
      if not (v == -1 and name == "eos_id") and not 0 <= v < vocab_size:
        raise SamplingError(f"{name}={v} is not a token id of the {vocab_size}-token vocabulary.")


def uniforms(key, length: int, batch_size: int) -> np.ndarray:
  """u [T, B] in [0, 1): the number that chooses row b's token at position t.

  Drawn on the host by numpy's Philox generator seeded with the key's bits: a pure function of the key (so of
  no mesh or process layout), and no random-number code to compile into the decode program, where it is slow
  to compile on CPU.
  """
  words = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
  seed = sum(int(w) << (32 * i) for i, w in enumerate(words.astype(np.uint32).ravel())) % (1 << 128)
  return np.random.Generator(np.random.Philox(key=seed)).random((length, batch_size), dtype=np.float32)


def _search(p_BK, target_B):
  """Index i with cumsum[i-1] ≤ target < cumsum[i], clamped onto entries with positive mass."""
  cdf_BK = jnp.cumsum(p_BK, axis=-1)
  idx_B = jnp.sum(cdf_BK <= target_B[:, None], axis=-1, dtype=jnp.int32)
  first_B = jnp.argmax(p_BK > 0, axis=-1).astype(jnp.int32)
  last_B = p_BK.shape[-1] - 1 - jnp.argmax(p_BK[:, ::-1] > 0, axis=-1).astype(jnp.int32)
  return jnp.clip(idx_B, first_B, last_B)


def _inverse_cdf(logits_BK, u_B):
  """A draw from softmax(logits_BK) given one uniform per row; never an entry of zero probability.

  Two levels keep it O(K): find the block of ~√K entries whose cumulative mass crosses u·total, then the entry
  inside that block. (A cumulative sum over the whole vocabulary costs more than the draw itself on a CPU.)
  """
  B, K = logits_BK.shape
  p_BK = jnp.exp(logits_BK - jnp.max(logits_BK, axis=-1, keepdims=True))
  blk = 1 << max(0, (K.bit_length() - 1) // 2)
  G = -(-K // blk)
  if G * blk != K:
    p_BK = jnp.pad(p_BK, ((0, 0), (0, G * blk - K)))
  p_BGb = p_BK.reshape(B, G, blk)
  mass_BG = jnp.sum(p_BGb, axis=-1)
  target_B = u_B * jnp.sum(mass_BG, axis=-1)
  g_B = _search(mass_BG, target_B)
  before_B = jnp.sum(jnp.where(jnp.arange(G) < g_B[:, None], mass_BG, 0.0), axis=-1)
  block_Bb = jnp.take_along_axis(p_BGb, g_B[:, None, None], axis=1)[:, 0]
  return g_B * blk + _search(block_Bb, target_B - before_B)


def sample_from_logits(u_B, logits_BV, sc: SamplingConfig):
  """One token per row from fp32 logits [B, V] under temperature, top-k and top-p; `u_B` are the uniforms."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sc.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sc.temperature
  V = logits_BV.shape[-1]
  if (sc.top_k == 0 or sc.top_k >= V) and sc.top_p >= 1.0:
    return _inverse_cdf(logits_BV, u_B)
  # Truncation works on the candidates sorted by decreasing probability.
  if 0 < sc.top_k < V:
    vals_BK, idx_BK = jax.lax.top_k(logits_BV, sc.top_k)
  else:
    iota_BV = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), logits_BV.shape)
    neg_BV, idx_BK = jax.lax.sort_key_val(-logits_BV, iota_BV, dimension=-1)
    vals_BK = -neg_BV
  if sc.top_p < 1.0:
    # Keep the smallest prefix whose mass reaches top_p: entry i stays if the mass before it is < top_p.
    probs_BK = jax.nn.softmax(vals_BK, axis=-1)
    before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    vals_BK = jnp.where(before_BK < sc.top_p, vals_BK, -jnp.inf)
  choice_B = _inverse_cdf(vals_BK, u_B)
  return jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _chunks(start: int, stop: int, n: int):
  """Position ranges [a, b) covering [start, stop); positions in [a, b) attend to at most b cache entries."""
  edges = sorted({start, stop, *(start + (stop - start) * i // n for i in range(1, n))})
  return list(zip(edges[:-1], edges[1:]))


def make_sampler(cfg: dec.ModelConfig, sc: SamplingConfig, batch_size: int, prompt_len: int, length: int,
                 mesh=None, chunks: int | None = None, return_logits: bool = False, layout: str | None = None):
  """A `Sampler`: sampler(params, prompt_BP, key) -> tokens [B, length] int32, the first P being the prompt.

  Decoding runs as `chunks` loops over consecutive position ranges, each attending only to the cache entries
  its last position can see: shapes stay static and the average cache read drops to ~(chunks+1)/(2·chunks).
  `layout` is the KV cache's (`decode.LAYOUTS`); None = the platform's (`decode.default_layout`).

  With `return_logits` the sampler returns (tokens [B, T], logits [B, T, V] fp32), where logits[:, t] are the
  model's raw logits (before temperature, top-k, top-p) predicting token t+1 from tokens 0..t: what a full
  forward pass over the sampled rows gives, up to rounding. The prompt's come from the prefill, the rest from
  the decode steps. The last position predicts nothing and is never decoded: it holds zeros (as do positions
  after every row stopped at `eos_id`, if the loop ends early). Cached per argument values (one compiled
  program each); arguments left at their defaults and passed explicitly share it.
  """
  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  layout = layout or decode.default_layout(platform)
  if layout not in decode.LAYOUTS:
    raise SamplingError(f"layout={layout!r} is not a cache layout: use one of {', '.join(decode.LAYOUTS)}.")
  if chunks is None:  # each range is one more loop to compile: worth it only for long rows that it shortens
    chunks = max(1, min(8, (length - prompt_len) // 32)) if layout == "heads_minor" else 1
  return _make_sampler(cfg, sc, batch_size, prompt_len, length, mesh, chunks, bool(return_logits), layout)


def _check(cfg: dec.ModelConfig, sc: SamplingConfig, B: int, Pl: int, T: int, mesh):
  sc.check(cfg.vocab_size)
  if not 1 <= Pl <= T:
    raise SamplingError(f"The prompt length {Pl} must lie in [1, length={T}]: give at least one prompt token "
                        "(a dataset id or BOS) and a length no shorter than the prompt.")
  if mesh is not None and B % sharding.batch_divisor(mesh):
    raise SamplingError(f"The sampling batch of {B} rows is not divisible by the {sharding.batch_divisor(mesh)} "
                        "data-parallel devices: choose a multiple of mesh.data × mesh.fsdp.")


def _decode_loops(carry, body, start: int, stop: int, chunks: int, early_stop: bool):
  """Runs body(pos, carry, span) for pos in [start, stop), as one loop per chunk; with `early_stop` each loop
  also ends once every row is done (carry[3])."""
  for a, b in _chunks(start, stop, chunks):
    span = max(2, b - 2)  # the range's last step decodes the token at b-2, which attends to entries 0..b-3
    if early_stop:
      def cond(c, b=b):
        return (c[0] < b) & ~jnp.all(c[1][3])
      def step(c, span=span):
        return c[0] + 1, body(c[0], c[1], span)
      carry = jax.lax.while_loop(cond, step, (jnp.int32(a), carry))[1]
    else:
      carry = jax.lax.fori_loop(a, b, functools.partial(body, span=span), carry)
  return carry


@functools.lru_cache(maxsize=32)
def _make_sampler(cfg: dec.ModelConfig, sc: SamplingConfig, batch_size: int, prompt_len: int, length: int,
                  mesh, chunks: int, return_logits: bool, layout: str):
  B, Pl, T = batch_size, prompt_len, length
  _check(cfg, sc, B, Pl, T, mesh)
  stop = sc.eos_id >= 0

  def constrain(x, batch_dim=0):  # rows over the batch axes, every other dimension left to XLA
    if mesh is None:
      return x
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[batch_dim] = sharding.BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

  def run(params, prompt_BP, u_TB):
    # Tokens are written by position, never where a slot holds pad_id: a prompt may contain that id.
    prompt_BP = constrain(prompt_BP.astype(jnp.int32))
    tokens_BT = constrain(jnp.full((B, T), sc.pad_id, jnp.int32))
    tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, prompt_BP, (0, 0))
    if Pl == T:
      return (tokens_BT, dec.logits(cfg, params, prompt_BP)) if return_logits else tokens_BT
    # Prefill: the whole prompt in one forward pass; its keys/values start the decode cache.
    logits_BPV, pre = dec.apply(cfg, params, prompt_BP, cache=dec.init_cache(cfg, B, Pl), cache_index=0)
    cache, decode_step = decode.make_step(cfg, layout, params, pre, B, T, constrain)
    token_B = sample_from_logits(u_TB[Pl], logits_BPV[:, -1], sc)
    tokens_BT = tokens_BT.at[:, Pl].set(token_B)
    done_B = token_B == sc.eos_id if stop else jnp.zeros((B,), bool)
    extra = ()
    if return_logits:  # a preallocated buffer in the loop carry, written one position per step
      logits_BTV = constrain(jnp.zeros((B, T, cfg.vocab_size), jnp.float32))
      extra = (jax.lax.dynamic_update_slice(logits_BTV, logits_BPV.astype(jnp.float32), (0, 0, 0)),)

    def body(pos, carry, span):
      tokens_BT, cache, token_B, done_B, *extra = carry
      # The token at pos-1 goes into the cache at pos-1; its logits choose the token at pos.
      logits_BV, cache = decode_step(cache, token_B, pos - 1, span)
      new_B = sample_from_logits(u_TB[pos], logits_BV, sc)
      if stop:
        new_B = jnp.where(done_B, sc.pad_id, new_B)
        done_B = done_B | (new_B == sc.eos_id)
      tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, new_B[:, None], (0, pos))
      if extra:  # nothing reads the old buffer: XLA writes the slice in place
        extra = [jax.lax.dynamic_update_slice(extra[0], logits_BV[:, None], (0, pos - 1, 0))]
      return (tokens_BT, cache, new_B, done_B, *extra)

    carry = _decode_loops((tokens_BT, cache, token_B, done_B, *extra), body, Pl + 1, T, chunks, stop)
    return (carry[0], carry[4]) if return_logits else carry[0]

  out_sh = sharding.batch_sharding(mesh) if mesh is not None else None
  if return_logits and mesh is not None:
    out_sh = (out_sh, sharding.batch_sharding(mesh, 3))
  u_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES)) if mesh is not None else None
  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  program = jax.jit(run, out_shardings=out_sh, compiler_options=platform_lib.sampler_compiler_options(platform))
  return Sampler(program=program, length=T, batch_size=B, u_sharding=u_sh)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """`sampler(params, prompt_BP, key)` -> tokens [B, T] (with `return_logits`: and logits [B, T, V]): the
  uniforms for every position are drawn from the key (`uniforms(key)` -> u [T, B]) and the compiled
  `program(params, prompt_BP, u_TB)` does the whole decode."""
  program: Callable
  length: int
  batch_size: int
  u_sharding: NamedSharding | None

  def uniforms(self, key) -> jax.Array:
    u_TB = uniforms(key, self.length, self.batch_size)
    if self.u_sharding is None:
      return jnp.asarray(u_TB)
    return jax.make_array_from_callback(u_TB.shape, self.u_sharding, lambda idx: u_TB[idx])

  def __call__(self, params, prompt_BP, key):
    return self.program(params, prompt_BP, self.uniforms(key))


def sample(cfg: dec.ModelConfig, params, prompt_BP, key, length: int | None = None,
           sc: SamplingConfig = SamplingConfig(), mesh=None):
  """Samples rows of `length` tokens (default cfg.seq_len) continuing `prompt_BP` (same length for every row).

  `prompt_BP` may be a host array or a global array; with a mesh the rows are sharded over its batch axes and
  `params` should already be placed by `sharding.param_shardings`.
  """
  B, Pl = prompt_BP.shape
  fn = make_sampler(cfg, sc, B, Pl, length or cfg.seq_len, mesh)
  if mesh is not None and not isinstance(prompt_BP, jax.Array):
    prompt_BP = sharding.put_batch(prompt_BP, mesh)
  return fn(params, prompt_BP, key)


def id_prompt(dataset_id: int, batch_size: int):
  """The replay prompt: every row starts from the dataset-id token alone."""
  return jnp.full((batch_size, 1), dataset_id, jnp.int32)


def clear_compiled():
  """Forgets the compiled samplers (a test that changes platform choices recompiles with the new ones)."""
  _make_sampler.cache_clear()
