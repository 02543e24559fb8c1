"""The 13 × 13 grid of model size × tokens per parameter (digest §3.2 G; 2d_grid loss_delta / compute_multiplier).

169 pretraining runs on FineWeb-Edu (cosine, LR 1e-3): D ∈ {256, 288, …, 640} (L=6; 5.77M–32.1M) × TPP ∈
{20, 28, …, 1280}; each finetuned on Nemotron-CC-Math (LR 1e-4, target loss 2.2, eval every 1M tokens)
without regularization and with real-data KL replay (coefficient 10): 338 finetuning runs.

Deviation: head_dim is 32 here (the paper's default 64 does not divide D = 288, 352, …); the paper's code
count 12·L·D² + D·V, and so the TPP, does not depend on it.

  jaxreplay sweep sweeps/grid_2d.py[:small] --workdir=runs/grid_2d

`:cpu` is the heatmap at CPU scale (docs/results.md (e)): widths D ∈ {16, 24, 32, 48} (L=2, head_dim 8,
vocabulary 1,024; 22.5K–104K parameters) × TPP ∈ {5, 14, 40, 113, 320} (64×, the paper's span) on the English
Bible (cosine, LR 1e-3, batch 32 × 64; about 16 evaluations per run, for the compute-multiplier curve), each
finetuned on the Spanish Bible for 0.4M tokens (cosine, LR 1e-3) without replay and with real-English KL at
coefficients 1, 3.2, 10 and 32 (32 added after 10 came out best in 16 of 20 cells). `report` compares a cell's
runs at the lowest Spanish loss all of them reached and shows the best coefficient. Seed 0.
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = dict(_paper.VARIANTS, cpu="the heatmap at CPU scale: 4 widths × 5 TPP, no replay and KL at 3 coefficients")

WIDTHS = list(range(256, 641, 32))
TPP = [20, 28, 40, 57, 80, 113, 160, 226, 320, 453, 640, 905, 1280]
ARMS = [{"replay.method": "none"}, _paper.kl_real(10.0)]
CPU_WIDTHS = [16, 24, 32, 48]
CPU_TPP = [5, 14, 40, 113, 320]
CPU_COEFFS = [1.0, 3.2, 10.0, 32.0]
CPU_EVALS = 16


def cpu_sweep():
  pre = _paper.config("en", True)
  pre.model.head_dim = 8
  pre.optim.update(schedule="cosine", batch_size=32)
  grid = []
  for d in CPU_WIDTHS:
    params = 12 * pre.model.n_layers * d * d + d * pre.model.vocab_size  # the paper's count, as stop.tokens_per_param
    for t in CPU_TPP:
      every = max(8192, int(round(params * t / CPU_EVALS, -3)))
      grid.append({"model.d_model": d, "stop.tokens_per_param": t, "eval.every_tokens": every})
  ft = _paper.finetune(_paper.config("es", True, tokens=400_000), "es", True)
  ft.optim.update(schedule="cosine", batch_size=32, warmup_tokens=20_000)
  ft.eval.every_tokens = 25_000
  ft.replay.update(method="kl", source="real")
  s = sweeps.Sweep(__doc__, pack=16)
  s.stage("pretrain", pre, grid, abbrev={"eval.every_tokens": "ev"})
  s.stage("finetune", ft, sweeps.chain({"replay.method": ["none"]}, {"replay.coeff": CPU_COEFFS}), after="pretrain")
  return s


def get_sweep(arg: str = ""):
  if arg == "cpu":
    return cpu_sweep()
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
