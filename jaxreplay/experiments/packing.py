"""Which runs of a sweep train together: packs of runs that differ only in values a packed step takes as arrays.

Runs whose configs agree on every other key (model, batch, sequence length, data, eval, replay method and row
count, the form of Adam, ...) compile to one program, so `group` puts them into packs of at most N, grouped by
length so that the member-steps spent idle after a member has stopped stay under MAX_IDLE_SHARE of the pack's
member-steps. Runs that cannot be packed with anything are chained: trained one after another in one process.
A differing key that changes the program only splits packs, never fails.
"""

from __future__ import annotations

import hashlib
import json
import os

from jaxreplay import config as config_lib
from jaxreplay.errors import UsageError
from jaxreplay.models import decoder
from jaxreplay.train import pack_step, stage

MAX_IDLE_SHARE = 0.25
# Keys (or key prefixes) whose values may differ inside a pack: each member gets its own.
PACKABLE = ("seed", "init.from", "optim.lr", "optim.b1", "optim.b2", "optim.b1_half_life_tokens",
            "optim.b2_half_life_tokens", "optim.eps", "optim.weight_decay", "optim.warmup_tokens", "optim.schedule",
            "optim.decay_fraction", "stop.steps", "stop.tokens", "stop.tokens_per_param", "stop.epochs",
            "stop.target_loss", "stop.early_stop_evals", "replay.coeff", "replay.source", "replay.path",
            "replay.cache_dir", "replay.buffer", "replay.temperature", "replay.top_k", "replay.top_p",
            "replay.dataset_id", "replay.prompt_ids", "log", "name", "description")


def _packable_key(key: str) -> bool:
  return any(key == p or key.startswith(p + ".") for p in PACKABLE)


def why_alone(c) -> str | None:
  """Why this run cannot join a pack (None: it can)."""
  if c.model.path:
    return "a Hugging Face model"
  if c.train.microbatches > 1:
    return "microbatches"
  if c.lora.rank > 0:
    return "LoRA"
  if c.stop.wall_time_s:
    return "a wall-time stop"
  if c.eval.get("lm_eval_tasks") or c.eval.mcq or c.eval.replay_rows or c.stop.get("target_metric"):
    return "task evaluations"
  if c.data.mix_fraction:
    return "a data mixture"
  if c.replay.method == "replace":
    return "replay.method='replace'"
  meta = os.path.join(c.data.path, "meta.json")
  if os.path.exists(meta):
    with open(meta) as f:
      if json.load(f).get("toy"):
        return "toy-task evaluations"
  if length(c) is None:
    return "no fixed length"
  return None


def program_key(c) -> str:
  """Equal for runs that compile to one packed program: every non-packable key, plus what is derived from
  packable ones but compiled in (Adam's form, where the KL teacher comes from)."""
  flat = config_lib.flatten(c.to_dict())
  fixed = {k: v for k, v in flat.items() if not _packable_key(k)}
  if c.replay.method == "replace":
    fixed["replay.coeff"] = c.replay.coeff
  derived = dict(adam=pack_step.adam_kind(c), teacher=config_lib.replay_teacher(c),
                 finetune=bool(c.init["from"]))
  return json.dumps([fixed, derived], sort_keys=True, default=str)


def length(c) -> int | None:
  """The run's length in steps, by the function the trainer uses (epochs from the data's metadata); None: unknown."""
  params = lambda: decoder.param_counts(decoder.ModelConfig.from_config(c.model))[c.model.param_count]
  per_epoch = None
  if c.stop.epochs and os.path.exists(meta := os.path.join(c.data.path, "meta.json")):
    with open(meta) as f:
      per_epoch = json.load(f)["train_tokens"] // c.model.seq_len * c.model.seq_len
  return stage.total_steps(c, params, per_epoch)


def idle_share(lengths: list[int]) -> float:
  """Member-steps a pack spends on stopped members, as a share of all its member-steps."""
  top = max(lengths)
  return sum(top - n for n in lengths) / (top * len(lengths))


def group(configs: dict, n: int, max_idle: float = MAX_IDLE_SHARE) -> list[list[str]]:
  """Packs of run names (at most n each, idle share ≤ max_idle); a pack of one trains alone.

  configs: {name: resolved config}, in the sweep's order; packs keep that order inside, and come in the order
  of their first member.
  """
  if n < 1:
    raise UsageError(f"--pack={n} must be ≥ 1: the most runs one process trains together (1 turns packing off).")
  by_program: dict[str, list[str]] = {}
  alone = []
  for name, c in configs.items():
    if n == 1 or why_alone(c):
      alone.append([name])
    else:
      by_program.setdefault(program_key(c), []).append(name)
  packs = list(alone)
  for names in by_program.values():
    lengths = {name: length(configs[name]) for name in names}
    packs.extend(_by_length(names, lengths, n, max_idle))
  order = {name: i for i, name in enumerate(configs)}
  for p in packs:
    p.sort(key=order.get)
  return sorted(packs, key=lambda p: order[p[0]])


def _by_length(names: list[str], lengths: dict, n: int, max_idle: float) -> list[list[str]]:
  """Longest first; a run joins the current pack while the pack stays within n and the idle share."""
  ordered = sorted(names, key=lambda name: -lengths[name])
  packs, current = [], []
  for name in ordered:
    trial = current + [name]
    if current and (len(trial) > n or idle_share([lengths[m] for m in trial]) > max_idle):
      packs.append(current)
      trial = [name]
    current = trial
  if current:
    packs.append(current)
  return packs


def pack_id(names: list[str]) -> str:
  return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def planned_share(packs: list[list[str]], configs: dict) -> float:
  """The idle share of a plan over all its packs (for --dry-run)."""
  lengths = [[length(configs[name]) or 0 for name in p] for p in packs]
  total = sum(max(ls) * len(ls) for ls in lengths)  # member-steps: each member runs as long as the longest
  return sum(max(ls) * len(ls) - sum(ls) for ls in lengths) / total if total else 0.0


def chains(singles: list[str], n: int) -> list[list[str]]:
  """Runs that train alone, chained n at a time into one process each."""
  return [singles[i:i + n] for i in range(0, len(singles), n)]


