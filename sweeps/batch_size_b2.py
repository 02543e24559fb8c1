"""Batch size × Adam β₂: constant β₂ vs constant half-life (DESIGN: batch-size-aware Adam).

Pretrain the 5.77M model on C4 English for a fixed budget of 20 tokens per parameter (115M tokens), cosine,
LR 1e-3, at batch sizes 4 … 256 sequences (× 256 tokens) with three β₂ rules: β₂ = 0.999 at every batch size
(constant β₂); a constant half-life t½ = 45.4M tokens, which gives β₂ = 0.999 at batch 256 (the two rules
agree there); and t½ = 10M tokens (the paper's optimum for a 30M model). β₂ = 0.5^(B·T / t½).

  jaxreplay sweep sweeps/batch_size_b2.py[:small] --workdir=runs/batch_size_b2
"""

import math

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

BATCHES = [4, 8, 16, 32, 64, 128, 256]


def half_life(b2: float, tokens_per_step: int) -> float:
  """Tokens after which β₂'s weight halves: tokens_per_step · ln 0.5 / ln β₂."""
  return round(tokens_per_step * math.log(0.5) / math.log(b2))


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  c = _paper.config("en", small, tokens_per_param=20)
  c.optim.schedule = "cosine"
  batches, ref_batch, fixed_hl = BATCHES, 256, [10_000_000.0]
  if small:
    batches, ref_batch, fixed_hl = [4, 16], 16, []
    c.stop.tokens_per_param = 0.5
  matched = float(half_life(0.999, ref_batch * c.model.seq_len))
  rules = sweeps.chain({"optim.b2": [0.999]}, {"optim.b2_half_life_tokens": [matched] + fixed_hl})
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", c, sweeps.product({"optim.batch_size": batches}, rules))
  return s
