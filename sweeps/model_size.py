"""Model size: larger models forget less (digest §3.2 E; capacity_slices, left panel).

Pretrain D ∈ {256, 384, 512, 640, 768} (L=6; 6M–46M) on C4 English, constant LR 1e-3, every model stopped at
validation loss 3.0 (evaluated every 1M tokens); finetune on C4 Spanish to target loss 2.76 (at most 10
epochs), LR 3e-4 cosine, real-data KL replay with replay batch 256, coefficient ∈ {0.01 … 10}.

  jaxreplay sweep sweeps/model_size.py[:small] --workdir=runs/model_size
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

WIDTHS = [256, 384, 512, 640, 768]
COEFFS = [0.01, 0.022, 0.046, 0.1, 0.22, 0.46, 1.0, 2.2, 4.6, 10.0]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("en", small, target_loss=3.0)
  pre.eval.every_tokens = 1_000_000
  ft = _paper.finetune(_paper.config("es", small, target_loss=2.76, epochs=10), "es", small)
  ft.optim.update(lr=3e-4, schedule="cosine")
  ft.replay.update(method="kl", source="real", batch_size=256)
  widths, coeffs = WIDTHS, COEFFS
  if small:  # every width to the same loss, capped in case the CPU is slow
    widths, coeffs = [32, 64], [0.1, 10.0]
    pre.eval.every_tokens = 25_000
    pre.stop.update(target_loss=4.8, tokens=300_000)
    ft.stop.update(target_loss=4.6, epochs=0, tokens=40_000)
    ft.replay.batch_size = 16
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre, {"model.d_model": widths})
  s.stage("finetune", ft, {"replay.coeff": coeffs}, after="pretrain")
  return s
