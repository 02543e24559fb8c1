"""CPU-scale reproduction (d): batch size × Adam β₂ at a fixed token budget (docs/results.md).

The claim (DESIGN: batch-size-aware Adam): at a fixed token budget, keeping β₂'s half-life in tokens constant
(β₂ = 0.5^(B·T / t½)) makes the final loss depend less on the batch size than keeping β₂ = 0.999.
Here: the `_paper` small model (163,840 parameters) pretrained on the English Bible for 2M tokens (≈ 12 TPP),
cosine, LR 1e-3, 10K-token warmup, at batch sizes 4, 16, 64, 256 sequences × 64 tokens, with β₂ = 0.999 at every
batch size, or a constant half-life t½ = 11.4M tokens, the one that gives β₂ = 0.999 at batch 256 (the two
rules agree there, as in sweeps/batch_size_b2.py). Seeds 0 and 1.

  jaxreplay sweep sweeps/repro_batch_size.py --workdir=runs/repro/batch_size --jobs=2
"""

import _paper
from batch_size_b2 import half_life
from jaxreplay.experiments import sweeps

VARIANTS = {"": "the CPU-scale reproduction (seeds 0 and 1)"}

BATCHES = [4, 16, 64, 256]
SEEDS = [0, 1]
TOKENS = 2_000_000


def get_sweep(arg: str = ""):
  if arg:
    raise ValueError(f"unknown variant {arg!r}: this sweep has none")
  c = _paper.config("en", True, tokens=TOKENS)
  c.optim.schedule = "cosine"
  c.eval.every_tokens = 500_000
  matched = float(half_life(0.999, max(BATCHES) * c.model.seq_len))
  rules = sweeps.chain({"optim.b2": [0.999]}, {"optim.b2_half_life_tokens": [matched]})
  s = sweeps.Sweep(__doc__, pack=16)  # same-shape runs train as packs (experiments/packing.py)
  s.stage("pretrain", c, sweeps.product({"optim.batch_size": BATCHES}, rules, {"seed": SEEDS}))
  return s
