"""Shared pieces of the paper's sweep files (not a sweep itself): paper defaults, data, the `:small` shrink.

Paper scale reads token directories made by `jaxreplay data tokenize` (run the sweep from the directory
that holds data/): C4 English/Spanish for the capacity experiments, FineWeb-Edu → Nemotron-CC-Math for the
2-D grid and the method comparison. `:small` swaps in the English/Spanish Bible pair with a 1,024-token
vocabulary (built on first use), a 164K-parameter model and lengths of a few hundred steps, so that a whole
sweep runs on a 2-core CPU in minutes; it checks the wiring, not the paper's numbers.
"""

from jaxreplay import config as config_lib

DATA = dict(en="data/c4_en", es="data/c4_es", fineweb="data/fineweb_edu", math="data/nemotron_math")
SMALL_DATA = dict(en="default:en:1024", es="default:es:1024", fineweb="default:en:1024", math="default:es:1024")
SMALL_PARAMS = 12 * 2 * 64 ** 2 + 64 * 1024  # the small model's paper-convention parameter count (163,840)


# Every paper sweep file declares these (jaxreplay.experiments.sweeps.variants lists them; `--variants` prints them).
VARIANTS = {"": "the paper's grid at paper scale", "paper": "the same as no argument",
            "small": "the same grid shrunk to run on a 2-core CPU in minutes (checks the wiring, not the numbers)"}


def is_small(arg: str) -> bool:
  if arg not in ("", "paper", "small"):
    raise ValueError(f"unknown variant {arg!r}: use no argument (the paper's grid) or 'small'")
  return arg == "small"


def paper_loss_to_ours(loss: float, T: int) -> float:
  """A loss the paper reports, in jaxreplay's convention: the paper's code averages the next-token loss over all
  T positions of a row with the last one (no target) set to 0, so it divides by T; jaxreplay divides by the T−1
  positions that have a target. Same weights, same sum: ours = paper · T/(T−1) (+0.39% at T=256). KL too."""
  return loss * T / (T - 1)


def paper_h2_to_ours(loss: float, T: int) -> float:
  """The paper's second-half loss, mean of loss[:, T/2:] (T/2 positions, the zeroed last one included), as the
  mean over the T/2−1 positions T/2 … T−2 that have a target: ours = paper · (T/2)/(T/2 − 1). jaxreplay's own
  `*_ntp_h2` averages positions T/2−1 … T−2 (one more at the front), so it matches this only approximately."""
  half = T // 2
  return loss * half / (half - 1)


def config(data: str, small: bool, **stop):
  """Paper defaults (D=256, L=6, AdamW 1e-3, 10M-token warmup, batch 256×256, 10M validation tokens).

  A `target_loss` given here is the paper's number, converted to jaxreplay's convention (paper_loss_to_ours);
  the `:small` variants set their own targets afterwards, in jaxreplay's convention.
  """
  c = config_lib.default()
  c.data.path = (SMALL_DATA if small else DATA)[data]
  c.eval.tokens = 10_000_000
  if small:
    c.model.update(d_model=64, n_layers=2, head_dim=32, seq_len=64, vocab_size=1024)
    c.optim.update(batch_size=16, warmup_tokens=10_000)
    c.eval.update(every_tokens=50_000, tokens=16_384, batch_size=32)
    c.checkpoint.update(every_steps=100, every_minutes=1.0)
    c.log.update(every_steps=50, progress=False)
  if stop.get("target_loss"):
    stop["target_loss"] = round(paper_loss_to_ours(stop["target_loss"], c.model.seq_len), 6)
  c.stop.update(**stop)
  return c


def finetune(c, data: str, small: bool):
  """The same model on the downstream data (fresh optimizer, fresh warmup: the paper re-initializes Adam)."""
  c.stage = "finetune"
  c.data.path = (SMALL_DATA if small else DATA)[data]
  return c


def kl_real(coeff=None):
  d = {"replay.method": "kl", "replay.source": "real"}
  return d if coeff is None else dict(d, **{"replay.coeff": coeff})
