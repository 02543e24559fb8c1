"""Toy continual learning: four arithmetic tasks in sequence (digest §3.2 C; toy_continual plot).

Tasks add → reversal → sort → modadd (3-digit operands, T = 14, vocabulary 19; jaxreplay/evals/toy.py), 2,000
steps each on a D=256, L=2, 16-head model (head_dim 16), AdamW β=(0.9, 0.99), wd 0.02, LR 1e-4 after a
200-step warmup, batch 2,048; every task is a finetuning stage from the previous one's export, so the
optimizer restarts at each task boundary as in the paper. Two arms (`match` keeps each arm's chain
separate): no replay, and NTP on self-generated samples (coefficient 10, 2,048 rows per step) from the model
at the start of the current task (the stage's init.from weights, kept frozen), prompted by every earlier
task's token (`replay.prompt_ids`, rows split evenly). Every evaluation logs the greedy exact-match accuracy
on all four tasks (`acc_add`, ...). The task data (65,536 train / 4,096 valid examples per task) is written
to data/toy*/ under the current directory when the sweep is loaded.

Variants: `:cpu` is the CPU-scale reproduction in docs/results.md (D=128, batch 128, LR 3e-3, 600 steps per
task, seeds 0–1); `:chain99` is :cpu with each stage trained until its own task reaches 99% exact match on its
validation examples (`stop.target_metric=acc_<task>`, cap 3,000 steps); `:small` only checks the wiring.

  jaxreplay sweep sweeps/toy_continual.py[:cpu|:small] --workdir=runs/toy_continual
"""

from jaxreplay import config as config_lib
from jaxreplay.experiments import sweeps
from jaxreplay.evals import toy

TASKS = list(toy.TASKS)
T = toy.SEQ_LEN
ARMS = [{"replay.method": "none"},
        {"replay.method": "ntp", "replay.source": "self", "replay.coeff": 10.0}]
# variant: (d_model, batch, lr, warmup steps, steps per task, eval every (steps), eval examples, seeds, data)
SETTINGS = {
    "": (256, 2048, 1e-4, 200, 2000, 20, 4096, [0], (65_536, 4_096)),
    "cpu": (128, 128, 3e-3, 20, 600, 50, 512, [0, 1], (65_536, 4_096)),
    "small": (32, 32, 3e-3, 2, 6, 3, 64, [0], (2_048, 256)),
    # the :cpu model and batch, but each stage runs until its own task is learned (step cap 3,000)
    "chain99": (128, 128, 3e-3, 20, 3000, 50, 512, [0, 1], (65_536, 4_096)),
}
TARGET = {"chain99": 0.99}  # variants whose stages stop once acc_<own task> on the validation examples reaches this


VARIANTS = {"": "the paper's setup (D=256, batch 2,048, 2,000 steps per task)", "paper": "the same as no argument",
            "cpu": "the CPU-scale reproduction in docs/results.md (D=128, 600 steps per task, seeds 0-1)",
            "small": "a few steps per task: checks the wiring",
            "chain99": "the :cpu setup, each stage trained until its own task is >= 99% exact match (cap 3,000 steps)"}


def task_config(task: str, variant: str):
  d, batch, lr, warmup, steps, every, n_eval, _, _ = SETTINGS[variant]
  c = config_lib.default()
  c.data.path = f"data/toy{'_' + variant if variant else ''}/{task}"
  c.model.update(d_model=d, n_layers=2, head_dim=16, seq_len=T, vocab_size=toy.VOCAB_SIZE)
  c.optim.update(lr=lr, b2=0.99, weight_decay=0.02, batch_size=batch, warmup_tokens=warmup * batch * T)
  c.eval.update(every_tokens=every * batch * T, tokens=n_eval * T, batch_size=min(512, n_eval))
  c.stop.steps = steps
  if variant in TARGET:  # a general metric stop: the stage ends once its own task is learned
    c.stop.update(target_metric=f"acc_{task}", target=TARGET[variant], target_mode="max")
  c.replay.update(batch_size=batch, buffer=16 if variant != "small" else 2,
                  prompt_ids=",".join(str(i) for i in range(TASKS.index(task))))  # every earlier task
  c.checkpoint.update(every_steps=max(100, steps // 4), every_minutes=5.0)
  c.log.update(every_steps=every, progress=False)
  return c


def get_sweep(arg: str = ""):
  variant = "" if arg == "paper" else arg
  if variant not in SETTINGS:
    raise ValueError(f"unknown variant {arg!r}: use no argument (the paper's setup), 'cpu', 'chain99' or 'small'")
  *_, seeds, (n_train, n_valid) = SETTINGS[variant]
  toy.build(f"data/toy{'_' + variant if variant else ''}", n_train, n_valid)
  s = sweeps.Sweep(__doc__, pack=16 if variant == "small" else 1)  # toy evals: chained, not packed
  prev = s.stage(TASKS[0], task_config(TASKS[0], variant), {"seed": seeds})
  for task in TASKS[1:]:
    c = task_config(task, variant)
    c.stage = "finetune"
    prev = s.stage(task, c, sweeps.product(ARMS, {"seed": seeds}), after=prev, match=("replay", "seed"))
  return s
