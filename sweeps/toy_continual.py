"""Toy continual learning: four arithmetic tasks in sequence (digest §3.2 C; toy_continual plot).

Tasks add → reversal → sort → modadd (3-digit operands, T = 14, vocabulary 19), 2,000 steps each on a
D=256, L=2, 16-head model (head_dim 16), AdamW β=(0.9, 0.99), wd 0.02, LR 1e-4 after a 200-step warmup,
batch 2,048; every task is a finetuning stage from the previous one, so the optimizer restarts at each task
boundary as in the paper. Two arms (`match` keeps each arm's chain separate): no replay, and NTP on
self-generated samples from the model at the start of the current task (coefficient 10, 2,048 per step).

Not yet runnable: the task data (data/toy/{add,reversal,sort,modadd}, built by another change), greedy
exact-match accuracy as an eval, and replay prompted with every previous task's BOS (the replay module now
prompts with one dataset id: the previous task's).

  jaxreplay sweep sweeps/toy_continual.py[:small] --workdir=runs/toy_continual
"""

from jaxreplay import config as config_lib
from jaxreplay import sweeps

TASKS = ["add", "reversal", "sort", "modadd"]
T, BATCH, STEPS = 14, 2048, 2000
ARMS = [{"replay.method": "none"},
        {"replay.method": "ntp", "replay.source": "self", "replay.coeff": 10.0, "replay.batch_size": BATCH}]


def task_config(task: str, small: bool):
  c = config_lib.default()
  c.data.path = f"data/toy{'_small' if small else ''}/{task}"
  c.model.update(d_model=256, n_layers=2, head_dim=16, seq_len=T, vocab_size=19)
  c.optim.update(lr=1e-4, b2=0.99, weight_decay=0.02, batch_size=BATCH, warmup_tokens=200 * BATCH * T)
  c.eval.update(every_tokens=20 * BATCH * T, tokens=4096 * T, batch_size=512)
  c.stop.steps = STEPS
  if small:
    c.model.update(d_model=64, head_dim=16)
    c.optim.update(batch_size=64, warmup_tokens=10 * 64 * T)
    c.eval.update(every_tokens=20 * 64 * T, tokens=256 * T, batch_size=64)
    c.stop.steps = 100
  return c


def get_sweep(arg: str = ""):
  if arg not in ("", "paper", "small"):
    raise ValueError(f"unknown variant {arg!r}: use no argument or 'small'")
  small = arg == "small"
  s = sweeps.Sweep(__doc__)
  prev = s.stage(TASKS[0], task_config(TASKS[0], small))
  arms = ARMS
  if small:
    arms = [dict(a, **({"replay.batch_size": 64} if "replay.batch_size" in a else {})) for a in ARMS]
  for task in TASKS[1:]:
    c = task_config(task, small)
    c.stage = "finetune"
    prev = s.stage(task, c, arms, after=prev, match=("replay",))
  return s
