"""CPU-scale reproduction (c): capacity — forgetting with the best KL coefficient against tokens per parameter.

The paper's claim (capacity slices, right panel): for one model size, the English loss after finetuning on
Spanish to a target loss, with the best real-data KL coefficient, rises further above the English loss before
finetuning the longer the model was pretrained. Here: the `_paper` small model (163,840 parameters) pretrained
on the English Bible (cosine, LR 1e-3, batch 32 × 64) for 1, 4, 16 and 64 tokens per parameter (0.16M–10.5M
tokens; the Bible's 1.4M training tokens are repeated beyond 8 TPP), then finetuned on the Spanish Bible
(LR 1e-3, cosine over 0.6M tokens, a fresh optimizer) with real-English KL replay at coefficients 0.1, 1 and
10 (plus no replay, for reference). Seed 0, or another with `:seed=N` (in its own workdir). Instead of a
target loss fixed in advance, `jaxreplay report` compares the runs at the lowest Spanish loss that every run
reached, interpolating each run's English loss there from its trajectory (identical to stopping each run at
that target).

  jaxreplay sweep sweeps/repro_tpp.py --workdir=runs/repro/tpp --jobs=2
  jaxreplay sweep sweeps/repro_tpp.py:seed=1 --workdir=runs/repro/tpp_seed1 --jobs=2
"""

import _paper
from jaxreplay.experiments import sweeps

VARIANTS = {"": "the CPU-scale reproduction, seed 0", "seed=N": "the same with seed N, in its own workdir"}

TPP = [1, 4, 16, 64]
COEFFS = [0.1, 1.0, 10.0]


def get_sweep(arg: str = ""):
  if arg and not arg.startswith("seed="):
    raise ValueError(f"unknown variant {arg!r}: use no argument (seed 0) or seed=N (another seed, in its own workdir)")
  seed = int(arg[5:]) if arg else 0
  pre = _paper.config("en", True)
  pre.seed = seed
  pre.optim.update(schedule="cosine", batch_size=32)
  pre.eval.every_tokens = 500_000
  ft = _paper.finetune(_paper.config("es", True, tokens=600_000), "es", True)
  ft.optim.update(schedule="cosine", batch_size=32, warmup_tokens=20_000)
  ft.eval.every_tokens = 50_000
  ft.replay.update(method="kl", source="real")
  ft.seed = seed
  s = sweeps.Sweep(__doc__, pack=16)  # same-shape runs train as packs (experiments/packing.py)
  s.stage("pretrain", pre, {"stop.tokens_per_param": TPP})
  s.stage("finetune", ft, sweeps.chain({"replay.method": ["none"]}, {"replay.coeff": COEFFS}), after="pretrain")
  return s
