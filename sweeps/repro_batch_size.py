"""CPU-scale reproduction (d): batch size × Adam β₂ at a fixed token budget (docs/results.md).

The claim (DESIGN: batch-size-aware Adam): at a fixed token budget, keeping β₂'s half-life in tokens constant
(β₂ = 0.5^(B·T / t½)) makes the final loss depend less on the batch size than keeping β₂ = 0.999.
Here: the `_paper` small model (163,840 parameters) pretrained on the English Bible for 2M tokens (≈ 12 TPP),
cosine, LR 1e-3, 10K-token warmup, at batch sizes 4, 16, 64, 256 sequences × 64 tokens, with β₂ = 0.999 at every
batch size, or a constant half-life t½ = 11.4M tokens, the one that gives β₂ = 0.999 at batch 256 (the two
rules agree there, as in sweeps/batch_size_b2.py). Seeds 0 and 1.

  jaxreplay sweep sweeps/repro_batch_size.py --workdir=runs/repro/batch_size --jobs=2

`:halflife` tests the paper's own claim (batchsize_digest.md §1.5): with the LR set per batch size, the best β₂
half-life in tokens is the same at every batch size while the best β₂ moves by orders of magnitude. A D=32, L=2,
T=32 model (vocabulary 1,024) on the English Bible, 1M tokens, cosine after a 5% warmup, B ∈ {4, 16, 64, 256}
sequences, t½ ∈ 10K · 4^k tokens (k = 0..5, 1,024× span), seeds 0 and 1. LR rule (stated, not tuned):
lr = 3e-3 · (B/256)^0.3, the B^0.3 centring the paper's lm30m grids use (digest §1.3).

`:halflife_long` is the same grid at a budget where the batch sizes are not step-limited: T=16 and 12M tokens
(2,930 steps at B=256, 187,500 at B=4; 8.4 epochs of the Bible), evaluated every 1M tokens to show the curves
flatten, and one more half-life, 40.96M tokens (4,096× span). ≈ 1 hour at --jobs=2 on a 2-core CPU.
"""


import _paper
from batch_size_b2 import half_life
from jaxreplay.experiments import sweeps

VARIANTS = {"": "the CPU-scale reproduction (seeds 0 and 1)",
            "halflife": "the paper's claim: best beta2 half-life in tokens vs batch size, LR set per batch size",
            "halflife_long": "the same at T=16 and 12M tokens, so that the large batches get thousands of steps"}

BATCHES = [4, 16, 64, 256]
SEEDS = [0, 1]
TOKENS = 2_000_000
HALF_LIVES = [10_000.0 * 4 ** k for k in range(6)]
LONG_HALF_LIVES = [10_000.0 * 4 ** k for k in range(7)]  # 40.96M added: the best of 6 was the longest
HL_TOKENS = 1_000_000
LONG_TOKENS = 12_000_000


def lr_for(batch: int) -> float:
  """The LR rule of :halflife: 3e-3 at B=256, scaled by B^0.3 (the paper's grid centring, not sqrt scaling)."""
  return round(3e-3 * (batch / 256) ** 0.3, 7)


def halflife_sweep(tokens: int = HL_TOKENS, seq_len: int = 32, half_lives=HALF_LIVES):
  c = _paper.config("en", True, tokens=tokens)
  c.model.update(d_model=32, head_dim=16, seq_len=seq_len)
  c.optim.update(schedule="cosine", warmup_tokens=tokens // 20)
  c.eval.update(every_tokens=tokens // 12 if tokens > HL_TOKENS else 100_000, tokens=16_384)
  if tokens > HL_TOKENS:  # up to 187,500 steps a run: checkpoint and log by time, not every 100 steps
    c.checkpoint.update(every_steps=20_000, every_minutes=5.0)
    c.log.update(every_steps=2_000)
  per_batch = sweeps.chain(*({"optim.batch_size": [b], "optim.lr": [lr_for(b)]} for b in BATCHES))
  s = sweeps.Sweep(__doc__, pack=16)  # the half-lives and seeds of one B are one program
  s.stage("pretrain", c, sweeps.product(per_batch, {"optim.b2_half_life_tokens": half_lives}, {"seed": SEEDS}))
  return s


def get_sweep(arg: str = ""):
  if arg == "halflife":
    return halflife_sweep()
  if arg == "halflife_long":
    return halflife_sweep(LONG_TOKENS, seq_len=16, half_lives=LONG_HALF_LIVES)
  if arg:
    raise ValueError(f"unknown variant {arg!r}: use no argument, 'halflife' or 'halflife_long'")
  c = _paper.config("en", True, tokens=TOKENS)
  c.optim.schedule = "cosine"
  c.eval.every_tokens = 500_000
  matched = float(half_life(0.999, max(BATCHES) * c.model.seq_len))
  rules = sweeps.chain({"optim.b2": [0.999]}, {"optim.b2_half_life_tokens": [matched]})
  s = sweeps.Sweep(__doc__, pack=16)  # same-shape runs train as packs (experiments/packing.py)
  s.stage("pretrain", c, sweeps.product({"optim.batch_size": BATCHES}, rules, {"seed": SEEDS}))
  return s
