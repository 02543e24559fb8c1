"""Method comparison at 205M (digest §3.2 B; method_comp plot, a README key result).

Pretrain D=1024, L=16 (16 heads; 205,520,896 parameters by the paper's count) on FineWeb-Edu, LR 1e-3,
cosine, 3 epochs. Finetune on Nemotron-CC-Math at LR 1e-5 (constant after warmup), early stop after 10
evaluations without a new best, six arms: standard finetuning, LoRA rank 16, and KL / NTP replay on real
FineWeb-Edu and on self-generated samples (coefficient 10, replay batch 64, buffer 16).

  jaxreplay sweep sweeps/method_comparison.py[:small] --workdir=runs/method_comparison
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = _paper.VARIANTS

ARMS = [
    {"replay.method": "none"},
    {"lora.rank": 16},
    {"replay.method": "kl", "replay.source": "real"},
    {"replay.method": "kl", "replay.source": "self"},
    {"replay.method": "ntp", "replay.source": "real"},
    {"replay.method": "ntp", "replay.source": "self"},
]


def get_sweep(arg: str = ""):
  small = _paper.is_small(arg)
  pre = _paper.config("fineweb", small, epochs=3)
  ft = _paper.finetune(_paper.config("math", small, early_stop_evals=10), "math", small)
  for c in (pre, ft):
    c.model.update(d_model=1024, n_layers=16, head_dim=64)
  pre.optim.schedule = "cosine"
  ft.optim.lr = 1e-5
  ft.replay.update(coeff=10.0, batch_size=64, buffer=16)
  if small:
    for c in (pre, ft):
      c.model.update(d_model=64, n_layers=2, head_dim=32)
    pre.stop.update(epochs=0, tokens=300_000)
    ft.optim.update(lr=1e-3, warmup_tokens=5_000)
    ft.eval.every_tokens = 10_000
    ft.stop.update(early_stop_evals=3, tokens=30_000)
    ft.replay.update(batch_size=16, buffer=4)
  s = sweeps.Sweep(__doc__, pack=16 if small else 1)  # :small packs its same-shape runs (experiments/packing.py)
  s.stage("pretrain", pre)
  s.stage("finetune", ft, ARMS, after="pretrain")
  return s
