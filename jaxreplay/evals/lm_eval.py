"""lm-evaluation-harness on jaxreplay checkpoints: an `lm_eval` LM over the jitted forward pass and the sampler.

`JaxReplayLM` (registered as the harness model "jaxreplay") scores any checkpoint jaxreplay can load: a
paper-model run (WORKDIR/export), an instruct run (WORKDIR/hf) or a Hugging Face Llama/Qwen directory.

  from lm_eval import simple_evaluate
  import jaxreplay.evals.lm_eval  # registers the model
  simple_evaluate(model="jaxreplay", model_args="path=runs/en,batch_size=16", tasks=["arc_easy"])

`loglikelihood` and `loglikelihood_rolling` run batches of rows through one jitted forward pass (rows sorted by
length, padded to a multiple of 64 tokens, so few programs compile); `generate_until` decodes greedily with the
KV-cache sampler, batching requests of equal prompt length. A paper model sees the run's dataset-id token where
a Hugging Face model sees BOS: it is the prefix of an empty context and of every rolling window.

`load_scorer` is the one place that touches the model, the sampler and the checkpoint formats.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxreplay import rundir
from jaxreplay.errors import LMEvalError
from jaxreplay.models import decoder, export as export_lib, hf_import, sampler
from jaxreplay.evals import mcq
from jaxreplay.data import load_tokenizer
from jaxreplay.data.tokenizer import eos_id


# ----------------------------------------------------------------------------- the seam to the model code

@dataclasses.dataclass(frozen=True)
class Scorer:
  """Everything the adapter needs of a checkpoint: a jaxreplay export's or an imported Llama/Qwen's model,
  tokenizer and prefix."""
  cfg: Any
  params: Any
  encode: Callable[[str], list[int]]
  decode: Callable[[list[int]], str]
  prefix_id: int  # what an empty context and each rolling window start from
  eos_id: int
  pad_id: int
  max_length: int
  name: str = "jaxreplay"


def paper_scorer(cfg, params, tokenizer, prefix_id: int) -> Scorer:
  """A paper-model scorer over a `tokenizers.Tokenizer` (jaxreplay's BPE); also what the evaluator hook uses."""
  eos = eos_id(tokenizer)
  return Scorer(cfg, params, lambda s: tokenizer.encode(s).ids,
                lambda ids: tokenizer.decode(list(ids)), int(prefix_id), eos, eos, cfg.seq_len)


def load_scorer(path: str, max_length: int | None = None, prefix_id: int | None = None) -> Scorer:
  """A Scorer for a paper-model run (PATH/export), an instruct run (PATH/hf) or a Hugging Face directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(os.path.join(rundir.export_dir(path), "info.json")):
    config, info = export_lib.exported_config(path), export_lib.exported_info(path)
    cfg = decoder.ModelConfig.from_config(ml_collections.ConfigDict(config["model"]), "float32",
                                          jax.default_backend())
    tok_path = info.get("tokenizer", {}).get("tokenizer_path") or os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise LMEvalError(f"The run in {path} names no tokenizer that exists ({tok_path}): copy the tokenizer.json "
                        f"of its data into {path}.")
    tok = load_tokenizer(tok_path)
    s = paper_scorer(cfg, export_lib.load_exported(path), tok,
                     info.get("dataset_id", 0) if prefix_id is None else prefix_id)
    return dataclasses.replace(s, max_length=min(max_length or cfg.seq_len, cfg.seq_len), name=path)
  hf_dir = next((d for d in (os.path.join(path, rundir.HF), path) if os.path.exists(os.path.join(d, "config.json"))),
                None)
  if hf_dir is None:
    raise LMEvalError(f"{path} holds no model to evaluate: give the workdir of a finished run (with export/ or "
                      "hf/) or a Hugging Face model directory.")
  from transformers import AutoTokenizer  # lazy: only Hugging Face directories need it (`hf` extra)
  hf = hf_import.read_config(hf_dir)
  length = max_length or min(int(hf.get("max_position_embeddings", 2048)), 2048)
  cfg, params, _ = hf_import.load(hf_dir, seq_len=length)
  tok = AutoTokenizer.from_pretrained(hf_dir)
  eos = tok.eos_token_id if tok.eos_token_id is not None else 0
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos
  prefix = tok.bos_token_id if tok.bos_token_id is not None else eos
  return Scorer(cfg, params, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                lambda ids: tok.decode(list(ids), skip_special_tokens=True),
                int(prefix if prefix_id is None else prefix_id), int(eos), int(pad), length, hf_dir)


# ----------------------------------------------------------------------------- the harness model

@register_model("jaxreplay")
class JaxReplayLM(TemplateLM):
  """The harness's view of a jaxreplay checkpoint (model_args: path, batch_size, max_length, prefix_id,
  max_gen_toks, encode_separately).

  encode_separately: tokenize the context and the continuation on their own (as a chat model sees a prompt
  and then its answer) instead of the harness's default, the whole text split at the context's length.
  """

  def __init__(self, path: str | None = None, scorer: Scorer | None = None, batch_size: int = 16,
               max_length: int | None = None, prefix_id: int | None = None, max_gen_toks: int = 256,
               encode_separately: bool = False, **_):
    super().__init__()
    if scorer is None and path is None:
      raise LMEvalError("The jaxreplay harness model needs path=RUN_WORKDIR (or a Scorer).")
    self.scorer = scorer or load_scorer(path, int(max_length) if max_length else None,
                                        int(prefix_id) if prefix_id not in (None, "") else None)
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.encode_separately = str(encode_separately).lower() in ("1", "true", "yes")

  @property
  def eot_token_id(self) -> int:
    return self.scorer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.scorer.prefix_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def tokenizer_name(self) -> str:
    return self.scorer.name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return list(self.scorer.encode(string))

  def _encode_pair(self, context: str, continuation: str):
    if self.encode_separately:
      return self.tok_encode(context), self.tok_encode(continuation)
    return super()._encode_pair(context, continuation)

  def score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) of the last n tokens of each (tokens, n) row, each token scored given the
    ones before it (`mcq.completion_logprobs`). Rows are at most max_length + 1 tokens."""
    s, rows = self.scorer, [(ids, len(ids) - n) for ids, n in rows]
    logp, greedy = mcq.completion_logprobs(s.cfg, s.params, rows, s.pad_id, self.batch_size)
    return [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    rows = []
    for _, context_enc, continuation_enc in requests:
      whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]  # keep the end, as HF does
      rows.append((whole, min(len(continuation_enc), len(whole) - 1)))
    results = self.score_rows(rows)
    for (pair, _, _), res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", pair, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    rows, owner = [], []
    for k, req in enumerate(requests):
      windows = get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1)
      for context, pred in map(make_disjoint_window, windows):
        rows.append((list(context) + list(pred), len(pred)))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self.score_rows(rows)):
      totals[k] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut before the first `until` string (sampling settings are ignored)."""
    jobs = []
    for req in requests:
      context, kwargs = req.args
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
      gen = max(1, min(gen, self.max_length - 1))
      ids = self.tok_encode(context) or [self.prefix_token_id]
      jobs.append((ids[-(self.max_length - gen):], gen, until))
    out: list = [None] * len(jobs)
    groups: dict = {}
    for i, (ids, gen, _) in enumerate(jobs):
      groups.setdefault((len(ids), gen), []).append(i)
    s = self.scorer
    greedy = sampler.SamplingConfig(temperature=0.0, eos_id=s.eos_id, pad_id=s.pad_id)  # pad after eos
    for (P, gen), idx in groups.items():
      for b in range(0, len(idx), self.batch_size):
        chosen = idx[b:b + self.batch_size]
        prompt = jnp.asarray([jobs[i][0] for i in chosen], jnp.int32)
        tokens = np.asarray(sampler.sample(s.cfg, s.params, prompt, jax.random.key(0), P + gen, greedy))
        for r, i in enumerate(chosen):
          new = [int(t) for t in tokens[r, P:]]
          if self.scorer.eos_id in new:
            new = new[:new.index(self.scorer.eos_id)]
          text = self.scorer.decode(new)
          for stop in jobs[i][2]:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


# ----------------------------------------------------------------------------- running tasks

@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, tasks: tuple[str, ...]) -> TaskManager:
  """The harness's task index; only your own tasks when include_path holds them all (indexing the harness's
  thousands of built-in tasks takes most of a minute on a small CPU)."""
  if include_path:
    own = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in own.all_tasks for t in tasks):
      return own
  return TaskManager(include_path=include_path) if include_path else TaskManager()


def run_tasks(lm: JaxReplayLM, tasks: list[str], limit: int | float | None = None, include_path: str | None = None,
              num_fewshot: int | None = None, log_samples: bool = False) -> dict:
  """The harness's results dict for `tasks` (names known to the harness or defined under include_path)."""
  manager = task_manager(include_path, tuple(tasks))
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise LMEvalError(f"Unknown lm-eval task(s) {', '.join(unknown)}: list the harness's tasks with "
                      "`lm-eval ls tasks`, or define yours in a YAML file under --include_path.")
  results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                            task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
  if results is None:
    raise LMEvalError("lm-eval returned no results (a non-zero rank of a distributed run).")
  return results


def flat_scores(results: dict) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} from the harness's results ('acc,none' → 'acc'; other filters keep '/filter')."""
  out = {}
  for task, metrics in results["results"].items():
    row = {}
    for key, value in metrics.items():
      if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      metric, filt = key.split(",", 1)
      row[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    out[task] = row
  return out


def evaluator_for(c, model_cfg, dataset_id: int, tokenizer_path: str):
  """The evaluator hook of train.run: config.eval.lm_eval_tasks at every evaluation, as lm_eval/TASK/METRIC."""
  tasks = [t.strip() for t in str(c.eval.lm_eval_tasks).split(",") if t.strip()]
  tokenizer = load_tokenizer(tokenizer_path)
  limit = int(c.eval.get("lm_eval_limit", 0)) or None
  include = c.eval.get("lm_eval_include_path", "") or None

  def evaluate(params) -> dict:
    lm = JaxReplayLM(scorer=paper_scorer(model_cfg, params, tokenizer, dataset_id),
                     batch_size=int(c.eval.batch_size))
    scores = flat_scores(run_tasks(lm, tasks, limit, include))
    return {f"lm_eval/{task}/{m}": v for task, row in scores.items() for m, v in row.items()
            if not m.endswith("_stderr")}
  return evaluate


def write_mcq_task(items: list[dict], tokenizer, directory: str, name: str, system: str = "") -> str:
  """The instruct experiment's multiple-choice scoring (mcq.py) as a harness task under `directory`.

  Each item's context is its chat-formatted question up to the assistant's turn and its choices are the
  completions "ANSWER: X", scored by summed log-probability and compared by `acc`, as mcq.evaluate does. Run
  it with encode_separately=True: mcq.py tokenizes the prompt and the completion on their own.
  """
  os.makedirs(directory, exist_ok=True)
  data = os.path.join(os.path.abspath(directory), f"{name}.jsonl")
  with open(data, "w") as f:
    for it in items:
      prompt = tokenizer.apply_chat_template(mcq.prompt_messages(it, system), tokenize=False,
                                             add_generation_prompt=True)
      choices = [mcq.COMPLETION.format(letter=l) for l in mcq.LETTERS[:len(it["choices"])]]
      f.write(json.dumps(dict(prompt=prompt, choices=choices, answer=int(it["answer"]))) + "\n")
  spec = dict(task=name, dataset_path="json", dataset_kwargs=dict(data_files=dict(test=data)), test_split="test",
              output_type="multiple_choice", doc_to_text="{{prompt}}", doc_to_choice="{{choices}}",
              doc_to_target="{{answer}}", target_delimiter="",
              metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True)])
  path = os.path.join(directory, f"{name}.yaml")
  with open(path, "w") as f:
    json.dump(spec, f, indent=2)  # JSON is YAML
  return path
