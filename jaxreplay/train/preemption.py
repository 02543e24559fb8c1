"""SIGTERM (what spot TPUs and schedulers send before a kill) → every host saves the same step, then exits.

Multi-host runs use JAX's preemption sync manager, started by `jax.distributed.initialize`: its own SIGTERM
handler tells the coordination service, which picks a step every host has not yet passed, and
`reached(step)` turns True on every host at that step. A single process (or a multi-host run without that
service) turns SIGTERM into a flag; without the service, hosts agree on the flag every `sync_every` steps.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def _sync_manager():
  try:
    from jax._src import distributed
  except ImportError:  # pragma: no cover - private module moved
    return None
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


class Preemption:
  """Context manager for the training loop; call `reached(step)` after every step."""

  def __init__(self, sync_every: int = 10):
    self.sync_every = sync_every
    self.requested = False  # SIGTERM seen by this process's own handler
    self._old = None
    self._service = False

  def __enter__(self):
    self._service = jax.process_count() > 1 and _sync_manager() is not None
    if not self._service:  # the service's C++ handler must stay installed, so only add ours without it
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step every host checkpoints and stops at; call it with increasing steps."""
    if self._service:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      if step % self.sync_every:
        return False
      return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None
