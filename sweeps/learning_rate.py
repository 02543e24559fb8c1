"""Learning rate: pretraining LR × finetuning LR, with and without KL (digest §3.2 H; learning_rate plot).

Pretrain the 5.77M model on C4 English at constant peak LR ∈ {1e-2, 4.64e-3, 2.15e-3, 1e-3, 4.64e-4,
2.15e-4}, every run stopped at validation loss 3.2; finetune each on C4 Spanish to target loss 3.2 with LR ∈
{1e-3 … 1e-6} (half-decade steps), without regularization and with real-data KL replay (coefficient 10).
The number of steps each run needed (its `step` in the results) gives the LR × steps panel.

  jaxreplay sweep sweeps/learning_rate.py[:small] --workdir=runs/learning_rate
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

PRE_LRS = [1e-2, 4.64e-3, 2.15e-3, 1e-3, 4.64e-4, 2.15e-4]
FT_LRS = [1e-3, 3.16e-4, 1e-4, 3.16e-5, 1e-5, 3.16e-6, 1e-6]
ARMS = [{"replay.method": "none"}, _paper.kl_real(10.0)]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("en", small, target_loss=3.2)
  ft = _paper.finetune(_paper.config("es", small, target_loss=3.2), "es", small)
  pre_lrs, ft_lrs = PRE_LRS, FT_LRS
  if small:
    pre_lrs, ft_lrs = [1e-2, 1e-3], [1e-3, 1e-4]
    pre.eval.every_tokens = 25_000
    pre.stop.update(target_loss=4.6, tokens=300_000)
    ft.stop.update(target_loss=4.6, tokens=30_000)
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre, {"optim.lr": pre_lrs})
  s.stage("finetune", ft, sweeps.product({"optim.lr": ft_lrs}, ARMS), after="pretrain")
  return s
