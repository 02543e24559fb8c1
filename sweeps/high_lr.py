"""High learning rate with replay vs a lower learning rate, time to target (digest §3.2 I; high_lr plot).

Finetune an English model on C4 Spanish to target loss 3.3, recording wall-clock time (`elapsed_s`):
arm 1 lowers the LR (17 values, 1e-7 … 1e-3 in quarter decades, no replay); arm 2 keeps LR 1e-3 and replaces a
fraction of each batch with real English rows (`replace`, fractions 1/256 … 1/2; the paper lists 1/256 twice,
kept once here). LR 1e-3 without replay, the shared anchor, is arm 1's last run.

The paper's starting checkpoint (en/uht1a3m7) has no recorded config. Assumed here: the 5.77M model, C4
English, cosine, LR 1e-3, 1,000 tokens per parameter (pretraining loss ≈ 3.03, below every finetuned
English loss in the plot).

  jaxreplay sweep sweeps/high_lr.py[:small] --workdir=runs/high_lr
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

LRS = [m * 10.0 ** e for e in range(-7, -3) for m in (1.0, 1.78, 3.16, 5.62)] + [1e-3]
FRACTIONS = [1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("en", small, tokens_per_param=1000)
  pre.optim.schedule = "cosine"
  ft = _paper.finetune(_paper.config("es", small, target_loss=3.3), "es", small)
  ft.replay.source = "real"
  lrs, fractions = [round(x, 12) for x in LRS], FRACTIONS
  if small:
    lrs, fractions = [1e-4, 1e-3], [1 / 16, 1 / 4]
    pre.stop.tokens_per_param = 1.5
    ft.stop.update(target_loss=4.6, tokens=30_000)
  arms = sweeps.chain({"optim.lr": lrs},
                      sweeps.product({"optim.lr": [1e-3], "replay.method": ["replace"]}, {"replay.coeff": fractions}))
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre)
  s.stage("finetune", ft, arms, after="pretrain")
  return s
