"""What a sweep costs before it runs: each run's shape, length in tokens and steps, and training FLOPs.

FLOPs per processed token are the model's `flops_per_token`: 6·N (N the paper's count 12·L·D² + D·V: every
matmul weight, the unembedding included, the embedding lookup not) plus 12·L·T·D for attention (PaLM's
count, no causal discount), forward and backward. A step processes its B downstream rows and, for kl/ntp
replay, its R replay rows (R = replay.batch_size, or B when 0) at that cost; KL replay adds a forward of the
frozen model (a third of it) on the replay rows, and kl_downstream on the downstream rows; self-generated
replay adds a forward per sampled token for its R rows a step. Evaluations are not counted.

A run's length is known when it is set in steps, tokens or tokens per parameter (epochs: when the data's
meta.json can be read here); a run that stops at a target loss or early stop has only its cap (an upper bound),
or no known length.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from jaxreplay import config as config_lib
from jaxreplay.experiments import packing
from jaxreplay.models import decoder

DEFAULT_PEAK_TFLOPS = 989.0  # one H100 SXM, dense bf16
DEFAULT_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class RunCost:
  name: str
  parent: str | None
  shape: str  # D, L, heads, V, T
  params: int  # the count stop.tokens_per_param uses (model.param_count)
  steps: int | None  # None: stops at a target loss (or early stop) with no cap
  tokens: int | None  # downstream tokens trained on
  flops: float | None
  bound: bool  # the length is a cap (target loss / early stop may end it sooner)
  unknown: str = ""  # why the length is not known: 'epochs' (its data is not here) or 'target' (no cap)


def flops_per_step(c: dict) -> float:
  """Training FLOPs of one optimizer step of the run with config c (a dict)."""
  m, r = c["model"], c["replay"]
  B, T = c["optim"]["batch_size"], m["seq_len"]
  per_token = decoder.flops_per_token(decoder.ModelConfig.from_config(ml_collections.ConfigDict(m)))
  rows = B
  if r["method"] in ("kl", "ntp"):
    R = r["batch_size"] or B
    rows += R
    if r["method"] == "kl":
      rows += R / 3  # the frozen model's forward on the replay rows
    if r["source"] == "self":
      rows += R / 3  # sampling them: one forward per generated token
  elif r["method"] == "kl_downstream":
    rows += B / 3
  return per_token * rows * T


def run_cost(run) -> RunCost:
  c = ml_collections.ConfigDict(run.config)
  m, s = c.model, c.stop
  if m.get("path"):  # an instruct run (a Hugging Face model): listed, not priced
    return RunCost(run.name, run.parent, "-", 0, None, None, None, False)
  params = decoder.param_counts(decoder.ModelConfig.from_config(m))[m.get("param_count", "paper")]
  steps = packing.length(c)  # None: a target loss or early stop with no cap, or epochs of data not found here
  shape = f"D={m.d_model} L={m.n_layers} H={m.d_model // m.head_dim} V={m.vocab_size} T={m.seq_len}"
  if steps is None:
    return RunCost(run.name, run.parent, shape, params, None, None, None, bool(s.target_loss or s.early_stop_evals),
                   "epochs" if s.epochs else "target")
  return RunCost(run.name, run.parent, shape, params, steps, steps * config_lib.tokens_per_step(c),
                 steps * flops_per_step(run.config), bool(s.target_loss or s.early_stop_evals))


def _num(x: float | None) -> str:
  if x is None:
    return "?"
  if x == 0:
    return "0"
  e = int(math.floor(math.log10(abs(x))))
  return f"{x:.0f}" if e < 6 else f"{x / 10 ** (e // 3 * 3):.3g}{' KMGTPEZY'[e // 3]}"


def format_costs(runs, peak_tflops: float = DEFAULT_PEAK_TFLOPS, mfu: float = DEFAULT_MFU) -> str:
  """One line per run (parent, shape, tokens, steps, FLOPs) and the sweep's total compute and device-hours."""
  costs = [run_cost(r) for r in runs]
  priced = [c for c in costs if c.shape != "-"]
  w = max(len(c.name) for c in costs)
  lines = [f"{'run':<{w}}  {'shape':<34} {'params':>8} {'tokens':>8} {'steps':>8} {'FLOPs':>8}  parent"]
  for c in costs:
    cap = "≤" if c.bound and c.flops is not None else ""
    lines.append(f"{c.name:<{w}}  {c.shape:<34} {_num(c.params) if c.params else '-':>8} {cap + _num(c.tokens):>8} {cap + _num(c.steps):>8} "
                 f"{cap + _num(c.flops):>8}  {c.parent or '-'}")
  if not priced:
    return "\n".join(lines)
  costs = priced
  known = [c for c in costs if c.flops is not None]
  total = sum(c.flops for c in known)
  by_epochs = sum(c.unknown == "epochs" for c in costs)
  by_target = sum(c.unknown == "target" for c in costs)
  capped = sum(c.bound for c in known)
  lines.append(f"total training compute: {total:.3e} FLOPs over {len(known)} of {len(costs)} runs"
               + (f" ({capped} of them at their cap: target loss or early stop may end them sooner)" if capped else "")
               + (f"; not counted: {by_target} runs that stop at a target loss or early stop with no cap" if by_target
                  else "")
               + (f"; not counted: {by_epochs} runs whose length is in epochs of data not found here (make it with "
                  "`jaxreplay data tokenize`, or run the dry run where it is)" if by_epochs else ""))
  hours = total / (peak_tflops * 1e12 * mfu) / 3600.0
  hours = f"{hours:,.1f}" if hours >= 1 else f"{hours:.2g}"
  lines.append(f"= {hours} device-hours at {peak_tflops:g} TFLOP/s peak and {mfu:.0%} MFU (--peak_tflops, "
               f"--mfu; defaults {DEFAULT_PEAK_TFLOPS:g}: one H100 bf16 dense, {DEFAULT_MFU:.0%})")
  return "\n".join(lines)
