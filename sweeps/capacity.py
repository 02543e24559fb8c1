"""Capacity: English/Spanish mixtures and self-generated KL replay (digest §3.2 A; the paper's Figure 1).

Left panel: 13 pretraining runs of the 5.77M model (D=256, L=6), C4 English with a fraction of each batch's
rows from C4 Spanish (1/128 … 127/128), cosine, LR 1e-3, to 17K tokens per parameter (the paper ran 10 epochs
of its ~10B-token English file, ≈ 98B tokens ≈ 17K TPP; TPP is used here so that other data sizes give the
same regime). Right panel: finetune the overtrained model on C4 Spanish with self-generated KL replay
(replay batch 64, buffer 16, LR 1e-4, cosine, 10 epochs), coefficient ∈ {0.01 … 10} (13 values); and the
Chinchilla model (20 TPP, 30% Spanish) with LR {3e-4, 1e-3} × coefficient {1, 3, 10}, warmup 1B tokens,
cosine, 100 epochs.

Which mixture the paper's overtrained start used is not recorded; its English loss (≈ 2.93, the best on the
frontier) points to the smallest Spanish fraction, 1/128, which is used here.

  jaxreplay sweep sweeps/capacity.py[:small] --workdir=runs/capacity
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

FRACTIONS = [1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 7 / 8, 15 / 16, 31 / 32, 63 / 64, 127 / 128]
COEFFS = [0.01, 0.018, 0.032, 0.056, 0.1, 0.18, 0.32, 0.56, 1.0, 1.78, 3.16, 5.62, 10.0]
SELF_KL = {"method": "kl", "source": "self", "batch_size": 64, "buffer": 16}


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  es = (_paper.SMALL_DATA if small else _paper.DATA)["es"]
  pre = _paper.config("en", small, tokens_per_param=17_000)
  pre.optim.schedule = "cosine"
  pre.data.mix_path = es
  chin = _paper.config("en", small, tokens_per_param=20)
  chin.optim.schedule = "cosine"
  chin.data.update(mix_path=es, mix_fraction=0.3)
  ft = _paper.finetune(_paper.config("es", small, epochs=10), "es", small)
  ft.optim.update(lr=1e-4, schedule="cosine")
  ft.replay.update(**SELF_KL)
  ft_chin = _paper.finetune(_paper.config("es", small, epochs=100), "es", small)
  ft_chin.optim.update(schedule="cosine", warmup_tokens=1_000_000_000)
  ft_chin.replay.update(**SELF_KL)
  fractions, coeffs, chin_grid = FRACTIONS, COEFFS, {"optim.lr": [3e-4, 1e-3], "replay.coeff": [1.0, 3.0, 10.0]}
  if small:
    fractions, coeffs, chin_grid = [1 / 8, 1 / 2, 7 / 8], [0.01, 10.0], {"optim.lr": [1e-3], "replay.coeff": [1.0]}
    pre.stop.tokens_per_param = 1.5
    chin.stop.tokens_per_param = 0.25
    for c in (ft, ft_chin):
      c.stop.update(epochs=0, tokens=30_000)
      c.optim.warmup_tokens = 5_000
      c.replay.update(batch_size=16, buffer=4)
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  pretrain = s.stage("pretrain", pre, {"data.mix_fraction": fractions})
  s.stage("pretrain_chinchilla", chin)
  s.stage("finetune", ft, {"replay.coeff": coeffs}, after=(pretrain, {"data.mix_fraction": fractions[0]}))
  s.stage("finetune_chinchilla", ft_chin, chin_grid, after="pretrain_chinchilla")
  return s
