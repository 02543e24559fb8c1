"""Training and evaluation batches cut from token files.

The data order is a pure function of the step (as in levanter): row r of the global batch at step s is
computed directly from (seed, s, r), with no iterator state. Resuming is therefore just the step number,
every process reads only the rows of its own slice, and two processes together produce exactly the
one-process batch. Epochs are shuffled by grain's index_shuffle (a keyed permutation of the row index,
O(1) memory, no permutation array); grain threads prefetch the next batches so the step never waits.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import grain
import numpy as np
from grain.experimental import index_shuffle

from jaxreplay.config import NUM_RESERVED_IDS
from jaxreplay.errors import DataError


from .tokenfile import TokenDir, open_token_dir

_ROUNDS = 4


def _open(token_dir: TokenDir | str, seq_len: int) -> TokenDir:
  return token_dir if isinstance(token_dir, TokenDir) else open_token_dir(token_dir, None, seq_len)


def _dataset_id(td: TokenDir, dataset_id: int) -> int:
  i = td.meta["dataset_id"] if dataset_id == -1 else dataset_id
  if not 0 <= i < NUM_RESERVED_IDS:
    raise DataError(f"Dataset id {i} for {td.path} is outside the reserved ids 0–{NUM_RESERVED_IDS - 1}: "
                    "set config.data.dataset_id to one of them.")
  return int(i)


def _process_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is outside 0..process_count-1 ({process_count}).")
  if global_batch % process_count:
    raise DataError(f"The global batch of {global_batch} rows does not split over {process_count} processes: "
                    "set config.optim.batch_size to a multiple of the process count.")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


class _Stream:
  """An endless, epoch-by-epoch shuffled sequence of non-overlapping seq_len rows of one token file."""

  def __init__(self, td: TokenDir, seq_len: int, seed: int, stream: int, dataset_id: int):
    self.num_rows = td.train.size // seq_len
    self.rows_TT = td.train[:self.num_rows * seq_len].reshape(self.num_rows, seq_len)
    self.seed, self.stream, self.dataset_id = seed % (1 << 63), stream, dataset_id

  @functools.lru_cache(maxsize=64)
  def _epoch_key(self, epoch: int) -> int:
    return int(np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1)[0])

  def row_ids(self, positions: Sequence[int]) -> np.ndarray:
    n = self.num_rows
    return np.array([index_shuffle(p % n, max_index=n - 1, seed=self._epoch_key(p // n), rounds=_ROUNDS)
                     for p in positions], dtype=np.int64)

  def rows(self, positions: Sequence[int]) -> np.ndarray:
    """The rows at stream positions, int32 [len(positions), T], dataset id first."""
    rows = self.rows_TT[self.row_ids(positions)].astype(np.int32)
    rows[:, 0] = self.dataset_id
    return rows


class TrainBatches:
  """Global batches of `global_batch` rows, of which this process gets its contiguous slice.

  `mix=(token_dir, fraction, dataset_id)` puts exactly round(fraction * global_batch) rows of a second
  dataset into every batch, evenly spread over the rows (so every process gets its share), each row
  starting with that dataset's id. An epoch counts rows of the main dataset.
  """

  def __init__(self, token_dir: TokenDir | str, seq_len: int, global_batch: int, seed: int,
               dataset_id: int = -1, process_index: int = 0, process_count: int = 1,
               mix: tuple | None = None, prefetch: int = 2):
    if seq_len < 2 or global_batch < 1:
      raise DataError(f"seq_len={seq_len} and global_batch={global_batch} must be ≥ 2 and ≥ 1.")
    self.seq_len, self.global_batch = seq_len, global_batch
    self.prefetch = max(0, prefetch)
    self.local = _process_slice(global_batch, process_index, process_count)
    main = _open(token_dir, seq_len)
    self.main = _Stream(main, seq_len, seed, 0, _dataset_id(main, dataset_id))
    self.mix_rows, self.mix = 0, None
    if mix is not None:
      mix_dir, fraction, mix_id = mix
      if not 0.0 <= fraction < 1.0:
        raise DataError(f"Mix fraction {fraction} must lie in [0, 1): set config.data.mix_fraction below 1.")
      self.mix_rows = int(round(fraction * global_batch))
      if self.mix_rows:
        mtd = _open(mix_dir, seq_len)
        self.mix = _Stream(mtd, seq_len, seed, 1, _dataset_id(mtd, mix_id))
        self._need_rows(self.mix, self.mix_rows, mtd.path)
    self.main_rows = global_batch - self.mix_rows
    if self.main_rows < 1:
      raise DataError(f"Mixing {fraction} of a batch of {global_batch} rows leaves no row for {main.path}: "
                      "lower config.data.mix_fraction.")
    self._need_rows(self.main, self.main_rows, main.path)
    r = np.arange(global_batch)
    is_mix = ((r + 1) * self.mix_rows) // global_batch > (r * self.mix_rows) // global_batch
    # For each local row: which stream, and its ordinal among that stream's rows of the global batch.
    ordinal = np.where(is_mix, np.cumsum(is_mix) - 1, np.cumsum(~is_mix) - 1)
    self._local_is_mix = is_mix[self.local]
    self._local_ordinal = ordinal[self.local]
    self.steps_per_epoch = self.main.num_rows / self.main_rows
    self.tokens_per_epoch = self.main.num_rows * seq_len

  def _need_rows(self, stream: _Stream, rows: int, path: str):
    if stream.num_rows < rows:
      raise DataError(f"{path}/train.bin holds {stream.num_rows} rows of {self.seq_len} tokens, fewer than the "
                      f"{rows} one batch takes from it: tokenize more text or lower config.optim.batch_size.")

  @property
  def dataset_ids(self) -> tuple[int, ...]:
    return (self.main.dataset_id,) + ((self.mix.dataset_id,) if self.mix else ())

  def batch(self, step: int) -> np.ndarray:
    """This process's rows of the global batch at `step`: int32 [global_batch // process_count, seq_len]."""
    if step < 0:
      raise DataError(f"step={step} must be ≥ 0.")
    out = np.empty((len(self._local_is_mix), self.seq_len), np.int32)
    for stream, rows_per_step, sel in ((self.main, self.main_rows, ~self._local_is_mix),
                                       (self.mix, self.mix_rows, self._local_is_mix)):
      if stream is not None and sel.any():
        out[sel] = stream.rows((step * rows_per_step + self._local_ordinal[sel]).tolist())
    return out

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(step, batch) from start_step on, computed ahead by grain threads."""
    stop = start_step + num_steps if num_steps is not None else 1 << 62
    ds = grain.MapDataset.range(start_step, stop).map(lambda s: (s, self.batch(s)))
    options = grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch)
    return iter(ds.to_iter_dataset(options))


class EvalBatches(Sequence):
  """Consecutive rows of a split in file order, cut into batches; the same every time it is read."""

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, dataset_id: int,
               local: slice):
    self.rows_TT = tokens[:num_batches * batch_size * seq_len].reshape(num_batches, batch_size, seq_len)
    self.dataset_id, self.local, self.num_batches = dataset_id, local, num_batches

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, k: int):
    if not -len(self) <= k < len(self):
      raise IndexError(k)
    batch = self.rows_TT[k, self.local].astype(np.int32)
    batch[:, 0] = self.dataset_id
    return batch

  @property
  def tokens(self) -> int:
    return self.rows_TT.size


def eval_batches(token_dir: TokenDir | str, split: str = "valid", seq_len: int = 256, batch_size: int = 64,
                 max_tokens: int | None = None, dataset_id: int = -1, process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
  """Evaluation batches (int32 [batch_size // process_count, seq_len]) of a split, no shuffle, remainder dropped.

  max_tokens caps the tokens read (at least one batch); fewer tokens than one batch is an error.
  """
  td = _open(token_dir, seq_len)
  tokens = td.split(split)
  local = _process_slice(batch_size, process_index, process_count)
  per_batch = batch_size * seq_len
  available = tokens.size // per_batch
  if available == 0:
    raise DataError(f"The {split} split of {td.path} holds {tokens.size} tokens, fewer than one eval batch of "
                    f"{batch_size}×{seq_len}={per_batch}: lower config.eval.batch_size or tokenize more "
                    f"{split} text (a larger valid_fraction).")
  n = available if not max_tokens else max(1, min(available, max_tokens // per_batch))
  return EvalBatches(tokens, seq_len, batch_size, n, _dataset_id(td, dataset_id), local)
