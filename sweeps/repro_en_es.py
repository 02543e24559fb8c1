"""CPU-scale reproduction (b): English → Spanish, forgetting with and without replay (docs/results.md).

The paper's claim: self-generated KL replay nearly eliminates forgetting (Figure 1, Chinchilla model;
method comparison). Here: the `_paper` small model (D=64, L=2, 2 heads, T=64, V=1,024; 163,840 parameters by
the paper's count) pretrained on the English Bible for 20 tokens per parameter (3.3M tokens, cosine, LR 1e-3,
batch 32 × 64), then finetuned on the Spanish Bible for 1M tokens (LR 1e-3 constant after a 20K-token warmup,
a fresh optimizer) in three arms: no replay, KL to the pretrained model on self-generated samples (prompted
by the English id, temperature 1, 32 rows per step, buffer 16), and KL on real English rows; coefficient 1
(the paper's Figure 1 setting for the Chinchilla model). Seeds 0, 1, 2 (each seed pretrains its own model).
Forgetting is compared at matched Spanish loss (`jaxreplay report`: matched.md).

  jaxreplay sweep sweeps/repro_en_es.py --workdir=runs/repro/en_es --jobs=2
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = {"": "the CPU-scale reproduction (seeds 0, 1, 2)"}

SEEDS = [0, 1, 2]
ARMS = [{"replay.method": "none"},
        {"replay.method": "kl", "replay.source": "self", "replay.coeff": 1.0},
        {"replay.method": "kl", "replay.source": "real", "replay.coeff": 1.0}]


def get_sweep(arg: str = ""):
  if arg:
    raise ValueError(f"unknown variant {arg!r}: this sweep has none")
  pre = _paper.config("en", True, tokens_per_param=20)
  pre.optim.update(schedule="cosine", batch_size=32)
  pre.eval.every_tokens = 200_000
  ft = _paper.finetune(_paper.config("es", True, tokens=1_000_000), "es", True)
  ft.optim.update(batch_size=32, warmup_tokens=20_000)
  ft.eval.every_tokens = 50_000
  ft.replay.update(batch_size=32, buffer=16)
  s = sweeps.Sweep(__doc__, pack=16)  # same-shape runs train as packs (experiments/packing.py)
  p = s.stage("pretrain", pre, {"seed": SEEDS})
  s.stage("finetune", ft, sweeps.product(ARMS, {"seed": SEEDS}), after=p, match=("seed",))
  return s
