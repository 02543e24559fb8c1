"""Metric writers (JSON lines, optional TensorBoard / W&B), progress bar, throughput and MFU.

MFU is model FLOPs per second divided by a matmul peak measured on this machine in this process, so the
number means the same thing on a laptop, a GPU and a TPU.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time

import jax
import jax.numpy as jnp

from jaxreplay import io, rundir
from jaxreplay.io import write_text


_PEAKS: dict = {}


def cached_matmul_peak(dtype=jnp.float32) -> float:
  """`measure_matmul_peak` once per process and dtype: runs of a sweep or a test session share it."""
  key = jnp.dtype(dtype).name
  if key not in _PEAKS:
    _PEAKS[key] = measure_matmul_peak(dtype, seconds=0.2)
  return _PEAKS[key]


def measure_matmul_peak(dtype=jnp.float32, n: int | None = None, seconds: float = 0.5) -> float:
  """FLOP/s of a square matmul in `dtype` on the default device (1024² on CPU, 8192² on accelerators)."""
  if n is None:
    n = 1024 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  reps, start = 0, time.perf_counter()
  while True:
    f(a, a).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and reps >= 3:
      return 2.0 * n ** 3 * reps / elapsed


def peak_memory_bytes() -> int | None:
  """Peak device memory if the backend reports it, else this process's peak RSS."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl; mirrors scalars to TensorBoard / W&B."""

  def __init__(self, workdir: str, log_cfg, config_dict: dict | None = None, resume_step: int = 0):
    self.path = io.join(workdir, rundir.METRICS)
    self.is_main = jax.process_index() == 0
    self._tb = self._wandb = None
    if self.is_main:
      io.makedirs(workdir)
      self._truncate_after(resume_step)
      self._out = io.Appender(self.path)  # on an object store: the whole object rewritten, rate-limited
      if log_cfg.tensorboard:
        from tensorboardX import SummaryWriter  # optional extra: pip install jaxreplay[tensorboard]
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      if log_cfg.wandb:
        import wandb  # optional extra: pip install jaxreplay[wandb]
        self._wandb = wandb.init(project=log_cfg.wandb_project, dir=workdir, config=config_dict,
                                 name=os.path.basename(os.path.abspath(workdir)), resume="allow")

  def _truncate_after(self, step: int):
    """A resumed run drops lines logged after its checkpoint, so the log equals an uninterrupted run's."""
    if not io.exists(self.path):
      return
    lines = [l + "\n" for l in io.read_text(self.path).splitlines() if l.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:
        break  # a line cut by a crash: drop it and everything after it
    write_text(self.path, "".join(kept))

  def write(self, step: int, metrics: dict):
    if not self.is_main:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._out.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(row, step=step)

  def flush(self):
    if self.is_main:
      self._out.flush()

  def close(self):
    if self.is_main:
      self._out.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class Throughput:
  """Tokens/s and MFU over the steps since the last report (excluding compile time of the first step)."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak_flops
    self._t, self._steps = time.perf_counter(), 0

  def reset(self):
    self._t, self._steps = time.perf_counter(), 0

  def tick(self):
    self._steps += 1

  def report(self) -> dict:
    elapsed = time.perf_counter() - self._t
    if not self._steps or elapsed <= 0:
      return {}
    tps = self.tokens_per_step * self._steps / elapsed
    out = {"tokens_per_s": tps}
    if self.peak:
      out["mfu"] = tps * self.flops_per_token / self.peak
    self.reset()
    return out
