"""Tokens per parameter: longer pretraining increases forgetting (digest §3.2 F; capacity_slices, right panel).

Pretrain the 5.77M model (D=256, L=6) on C4 English, cosine, LR 1e-3, for TPP ∈ {10 … 10,000}; finetune
each checkpoint on C4 Spanish (LR 1e-3, cosine, to target loss 2.9, at most 10 epochs) with real-data KL
replay, coefficient ∈ {0.01 … 10}. The plot takes, per TPP, the lowest English loss among runs that reached
the target.

  jaxreplay sweep sweeps/pretrain_length.py[:small] --workdir=runs/pretrain_length
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

TPP = [10, 31.6, 100, 316, 1000, 3162, 10000]
COEFFS = [0.01, 0.032, 0.1, 0.32, 1.0, 3.2, 10.0]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("en", small)
  pre.optim.schedule = "cosine"
  ft = _paper.finetune(_paper.config("es", small, target_loss=2.9, epochs=10), "es", small)
  ft.optim.schedule = "cosine"
  ft.replay.update(method="kl", source="real")
  tpp, coeffs = TPP, COEFFS
  if small:
    tpp, coeffs = [0.5, 1.0, 2.0], [0.1, 10.0]
    ft.stop.update(target_loss=4.5, epochs=0, tokens=40_000)
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre, {"stop.tokens_per_param": tpp})
  s.stage("finetune", ft, {"replay.coeff": coeffs}, after="pretrain")
  return s
