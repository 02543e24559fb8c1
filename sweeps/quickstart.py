"""Quickstart: pretrain a small model on English (KJV Bible), finetune on Spanish (Reina-Valera 1909)
with and without self-generated KL replay. Runs in minutes on a 2-core CPU.

  jaxreplay pretrain --config=sweeps/quickstart.py:pretrain --workdir=runs/qs/pretrain
  jaxreplay finetune --config=sweeps/quickstart.py:finetune --config.init.from=runs/qs/pretrain --workdir=...
"""

from jaxreplay import config as config_lib


VARIANTS = {"": "the quickstart sweep (minutes on a 2-core CPU)", "small": "a smaller vocabulary and shorter runs"}


def base():
  c = config_lib.default()
  c.model.update(d_model=128, n_layers=2, head_dim=32, seq_len=128, vocab_size=1024)
  c.optim.update(batch_size=32, lr=3e-3, warmup_tokens=100_000, schedule="cosine")
  c.eval.update(every_tokens=500_000, tokens=65_536, batch_size=32)
  c.checkpoint.update(every_steps=200)
  c.log.update(every_steps=20)
  return c


def get_config(arg: str = "pretrain"):
  c = base()
  if arg == "pretrain":
    c.data.path = "default:en:1024"
    c.stop.tokens = 2_500_000  # ≈5 tokens per parameter: a model with spare capacity, as in the paper's Figure 1
  elif arg in ("finetune", "finetune_kl"):
    c.stage = "finetune"
    c.data.path = "default:es:1024"
    c.optim.update(lr=1e-3, warmup_tokens=20_000, schedule="constant")
    c.stop.update(tokens=600_000)
    c.eval.every_tokens = 100_000
    if arg == "finetune_kl":
      c.replay.update(method="kl", source="self", coeff=1.0, batch_size=32, buffer=8)
  else:
    raise ValueError(f"unknown quickstart config {arg!r}: use pretrain, finetune or finetune_kl")
  return c


def get_sweep(arg: str = ""):
  """`jaxreplay sweep sweeps/quickstart.py --workdir=runs/qs`: pretrain, then finetune without and with
  self-generated KL replay. `:small` shrinks the vocabulary and lengths to run in a few minutes."""
  from jaxreplay.experiments import sweeps
  pre, ft = get_config("pretrain"), get_config("finetune")
  if arg == "small":
    for c in (pre, ft):
      c.model.update(d_model=64, n_layers=2, head_dim=32, seq_len=64, vocab_size=1024)
      c.optim.batch_size = 16
      c.eval.update(every_tokens=100_000, tokens=32_768, batch_size=16)
    pre.data.path, ft.data.path = "default:en:1024", "default:es:1024"
    pre.stop.tokens, ft.stop.tokens = 500_000, 200_000
    ft.optim.warmup_tokens = 10_000
  elif arg:
    raise ValueError(f"unknown quickstart sweep {arg!r}: use no argument or 'small'")
  s = sweeps.Sweep("quickstart: English pretraining, Spanish finetuning with and without self-generated KL replay",
                   pack=16 if arg == "small" else 1)
  s.stage("pretrain", pre)
  s.stage("finetune", ft, after="pretrain", grid=[
      {"replay.method": "none"},
      {"replay.method": "kl", "replay.source": "self", "replay.coeff": 1.0, "replay.batch_size": 16 if arg else 32,
       "replay.buffer": 8}])
  return s
