"""Multiple-choice evaluation by log-probability (MMLU, ARC-Challenge, CommonsenseQA style), chat-formatted.

Each question becomes one user turn (the prompt below, as in the paper's evaluation), rendered with the
tokenizer's chat template up to the assistant's turn; each choice X is scored by the summed log-probability
of the completion "ANSWER: X". Scores are renormalised over the choices (a softmax over the summed
log-probabilities); the prediction is the best-scoring choice.

Benchmark files are JSON lines: {"question": str, "choices": [str, ...], "answer": index or letter}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import config as config_lib, sharding
from jaxreplay.errors import MCQError
from jaxreplay.data import chat as chat_data
from jaxreplay.models import decoder, losses

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEMPLATE = ("Answer the following multiple choice question. The entire content of your response should be of the "
            "following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of {letters}.\n\n"
            "{question}\n\n{choices}")
COMPLETION = "ANSWER: {letter}"


def read_benchmark(path: str, limit: int = 0, seed: int | None = None) -> list[dict]:
  """Items {question, choices, answer: int}; with `seed`, shuffled before taking the first `limit`."""
  items = []
  for n, row in chat_data.json_lines(path, MCQError, "{question, choices, answer} objects"):
    try:
      q, choices, ans = row["question"], list(row["choices"]), row["answer"]
    except (KeyError, TypeError):
      raise MCQError(f"{path}:{n} is not a JSON object with question, choices and answer.") from None
    if isinstance(ans, str):
      ans = LETTERS.find(ans.strip().upper()) if len(ans.strip()) == 1 else -1
    if not 2 <= len(choices) <= len(LETTERS) or not isinstance(ans, int) or not 0 <= ans < len(choices):
      raise MCQError(f"{path}:{n}: answer {row['answer']!r} does not name one of its {len(choices)} choices "
                     "(give an index from 0 or a letter).")
    items.append(dict(question=q, choices=choices, answer=ans))
  if seed is not None:
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
  return items[:limit] if limit else items


def prompt_messages(item: dict, system: str = "") -> list[dict]:
  letters = LETTERS[:len(item["choices"])]
  text = TEMPLATE.format(letters=", ".join(letters), question=item["question"],
                         choices="\n".join(f"{l}) {c}" for l, c in zip(letters, item["choices"])))
  return ([dict(role="system", content=system)] if system else []) + [dict(role="user", content=text)]


def encode(tokenizer, items: list[dict], system: str = ""):
  """Rows (ids, start) for every (item, choice), and each item's number of choices."""
  rows = []
  for item in items:
    msgs = prompt_messages(item, system)
    for letter in LETTERS[:len(item["choices"])]:
      rows.append(chat_data.encode_prompt_completion(tokenizer, msgs, COMPLETION.format(letter=letter)))
  return rows, [len(it["choices"]) for it in items]


@functools.lru_cache(maxsize=8)
def _scorer(cfg: decoder.ModelConfig, mesh=None):
  def score(params, tokens_BT, mask_BT):
    logits_BTV = decoder.logits(cfg, params, tokens_BT)
    nll_BT, mask_BT = losses.token_nll(logits_BTV, tokens_BT), mask_BT[:, 1:]
    hit_BT = jnp.argmax(logits_BTV, axis=-1)[:, :-1] == tokens_BT[:, 1:]
    return -(nll_BT * mask_BT).sum(axis=1), jnp.all(hit_BT | (mask_BT == 0), axis=1)
  # Scores come back replicated, so every host can read all of them.
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(score, out_shardings=out)


def completion_logprobs(cfg, params, rows, pad_id: int, batch_size: int = 16, mesh=None):
  """Summed log-probability of each row's completion (tokens ids[start:]), and whether greedy decoding from
  ids[:start] reproduces it (every completion token is its position's argmax), as arrays [len(rows)].

  Rows are scored in order of length, each batch padded to a multiple of 64 tokens: few compilations, and a
  long question does not make every batch long.
  """
  if mesh is not None:
    div = sharding.batch_divisor(mesh)
    batch_size = -(-batch_size // div) * div
  order = np.argsort([len(ids) for ids, _ in rows], kind="stable")
  score = _scorer(cfg, mesh)
  out, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
  for b in range(0, len(rows), batch_size):
    chosen = order[b:b + batch_size]
    T = -(-max(len(rows[i][0]) for i in chosen) // 64) * 64
    tokens = np.full((batch_size, T), pad_id, np.int32)
    mask = np.zeros((batch_size, T), np.float32)
    for r, i in enumerate(chosen):
      ids, start = rows[i]
      tokens[r, :len(ids)] = ids
      mask[r, start:len(ids)] = 1.0
    if mesh is not None:  # each process supplies its share of the rows
      tokens, mask = (sharding.put_batch(sharding.local_rows(x), mesh) for x in (tokens, mask))
    logp, hit = (np.asarray(x) for x in jax.device_get(score(params, tokens, mask)))
    out[chosen], greedy[chosen] = logp[:len(chosen)], hit[:len(chosen)]
  return out, greedy


def evaluate(cfg, params, tokenizer, items: list[dict], batch_size: int = 16, mesh=None, system: str = "") -> dict:
  """accuracy, mean renormalised probability of the right answer, and the item count."""
  rows, n_choices = encode(tokenizer, items, system)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else max(cfg.pad_id, 0)
  scores, _ = completion_logprobs(cfg, params, rows, pad, batch_size, mesh)
  correct, prob = [], []
  at = 0
  for item, k in zip(items, n_choices):
    s = scores[at:at + k]
    at += k
    p = np.exp(s - s.max())
    p /= p.sum()
    correct.append(int(np.argmax(s)) == item["answer"])
    prob.append(float(p[item["answer"]]))
  return dict(accuracy=float(np.mean(correct)), correct_prob=float(np.mean(prob)), n=len(items),
              scores=scores)


def evaluator_for(c, model_cfg, tokenizer, mesh=None):
  """The trainer's evaluator for config.eval.mcq: params -> {mcq_NAME: accuracy, ..., mcq_mean}, or None."""
  benchmarks = {name: read_benchmark(path, c.eval.mcq_limit, c.eval.mcq_seed)
                for name, path in config_lib.mcq_benchmarks(c).items()}
  if not benchmarks:
    return None

  def evaluate_all(params) -> dict:
    out = {f"mcq_{name}": evaluate(model_cfg, params, tokenizer, items, c.eval.batch_size, mesh,
                                   c.data.system)["accuracy"] for name, items in benchmarks.items()}
    out["mcq_mean"] = float(np.mean(list(out.values())))
    return out

  return evaluate_all
