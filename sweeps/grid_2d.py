"""The 13 × 13 grid of model size × tokens per parameter (digest §3.2 G; 2d_grid loss_delta / compute_multiplier).

169 pretraining runs on FineWeb-Edu (cosine, LR 1e-3): D ∈ {256, 288, …, 640} (L=6; 5.77M–32.1M) × TPP ∈
{20, 28, …, 1280}; each finetuned on Nemotron-CC-Math (LR 1e-4, target loss 2.2, eval every 1M tokens)
without regularization and with real-data KL replay (coefficient 10): 338 finetuning runs.

Deviation: head_dim is 32 here (the paper's default 64 does not divide D = 288, 352, …); the paper's code
count 12·L·D² + D·V, and so the TPP, does not depend on it.

  jaxreplay sweep sweeps/grid_2d.py[:small] --workdir=runs/grid_2d
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

WIDTHS = list(range(256, 641, 32))
TPP = [20, 28, 40, 57, 80, 113, 160, 226, 320, 453, 640, 905, 1280]
ARMS = [{"replay.method": "none"}, _paper.kl_real(10.0)]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("fineweb", small)
  pre.optim.schedule = "cosine"
  pre.model.head_dim = 32
  ft = _paper.finetune(_paper.config("math", small, target_loss=2.2), "math", small)
  ft.model.head_dim = 32
  ft.optim.lr = 1e-4
  ft.eval.every_tokens = 1_000_000
  widths, tpp = WIDTHS, TPP
  if small:
    widths, tpp = [32, 64], [0.5, 2.0]
    ft.optim.lr = 1e-3
    ft.eval.every_tokens = 20_000
    ft.stop.update(target_loss=4.6, tokens=40_000)
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre, sweeps.product({"model.d_model": widths}, {"stop.tokens_per_param": tpp}))
  s.stage("finetune", ft, ARMS, after="pretrain")
  return s
