"""lm-evaluation-harness on jaxreplay checkpoints: tasks defined here over local JSON-lines files, a tiny model,
and every score checked against a naive computation (one unpadded row at a time, log-softmax in float64)."""

import functools
import json
import os
import sqlite3
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxreplay.io import read_metrics
from jaxreplay import config as config_lib
from jaxreplay.data import chat as chat_data
from jaxreplay.data import load_tokenizer, train_tokenizer, write_token_dir
from jaxreplay.data.tokenfile import every_kth
from jaxreplay.evals import lm_eval as adapter
from jaxreplay.evals import mcq
from jaxreplay.experiments import lm_eval_run
from jaxreplay.models import decoder, export as export_lib
from jaxreplay.train import loop

TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.",
         "And God said, Let there be light: and there was light.", "And God saw the light, that it was good."]
MC = [dict(question="In the beginning God created the", choices=["heaven", "light", "void"], answer=0),
      dict(question="And God said, Let there be", choices=["form", "light"], answer=1),
      dict(question="And the earth was without", choices=["form", "good", "God", "earth"], answer=0)]
SEQ_LEN = 32


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def write_task(directory, name, data, **spec):
  spec = dict(task=name, dataset_path="json", dataset_kwargs=dict(data_files=dict(test=str(data))),
              test_split="test", **spec)
  with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
    json.dump(spec, f)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
  """A tiny paper-model run: exported weights, its config and tokenizer, and three local harness tasks."""
  root = tmp_path_factory.mktemp("lm_eval")
  run = root / "sweep" / "runs" / "pretrain" / "tiny"
  run.mkdir(parents=True)
  (root / "sweep" / "sweep.json").write_text("{}")
  train_tokenizer(TEXTS * 20, 300, str(run / "tokenizer.json"))
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=SEQ_LEN, vocab_size=300)
  cfg = decoder.ModelConfig.from_config(c.model, "float32", jax.default_backend())
  params = decoder.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper predictions than at init: scores differ by choice
  export_lib.export(str(run), params, c.to_dict(), dict(step=0, dataset_id=3))
  tasks = root / "tasks"
  tasks.mkdir()
  write_jsonl(tasks / "mc.jsonl", MC)
  write_task(tasks, "tiny_mc", tasks / "mc.jsonl", output_type="multiple_choice", doc_to_text="{{question}}",
             doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
             metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True)])
  long_text = " ".join(TEXTS * 3)  # longer than the model's context: several rolling windows
  write_jsonl(tasks / "docs.jsonl", [dict(text=t) for t in TEXTS[:2] + [long_text]])
  write_task(tasks, "tiny_ppl", tasks / "docs.jsonl", output_type="loglikelihood_rolling", doc_to_text="",
             doc_to_target="{{text}}", metric_list=[dict(metric="word_perplexity"), dict(metric="bits_per_byte")])
  write_jsonl(tasks / "gen.jsonl", [dict(question=t[:20], answer=t[20:]) for t in TEXTS])
  write_task(tasks, "tiny_gen", tasks / "gen.jsonl", output_type="generate_until", doc_to_text="{{question}}",
             doc_to_target="{{answer}}", generation_kwargs=dict(until=["."], max_gen_toks=6),
             metric_list=[dict(metric="exact_match", aggregation="mean", higher_is_better=True)])
  tok = load_tokenizer(str(run / "tokenizer.json"))
  return dict(run=str(run), root=str(root), tasks=str(tasks), cfg=cfg, params=params, tok=tok)


@functools.lru_cache(maxsize=None)
def naive_forward(cfg):
  return jax.jit(functools.partial(decoder.logits, cfg))


def naive_logits(cfg, params, ids):
  """Logits of one row, right-padded to the model's length (causal: padding after a token cannot change it)."""
  row = np.zeros((1, SEQ_LEN), np.int32)
  row[0, :len(ids)] = ids
  return np.asarray(naive_forward(cfg)(params, row)[0, :len(ids)], np.float64)


def naive_logprobs(cfg, params, ids):
  """log p(ids[t] | ids[:t]) for t ≥ 1: one row on its own, float64 log-softmax in numpy."""
  logits = naive_logits(cfg, params, ids[:-1])
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return logp[np.arange(len(ids) - 1), ids[1:]], logits.argmax(-1) == np.asarray(ids[1:])


def samples_by_doc(results, task):
  return {s["doc_id"]: s for s in results["samples"][task]}


def test_multiple_choice_scores_equal_a_naive_forward_pass(paper_run):
  cfg, params, tok = paper_run["cfg"], paper_run["params"], paper_run["tok"]
  lm = adapter.JaxReplayLM(paper_run["run"], batch_size=2)  # batches of 2 rows: padding and several batches
  assert lm.prefix_token_id == 3 and lm.max_length == SEQ_LEN
  results = adapter.run_tasks(lm, ["tiny_mc"], include_path=paper_run["tasks"], log_samples=True)
  correct = []
  for i, item in samples_by_doc(results, "tiny_mc").items():
    doc = MC[i]
    ctx = tok.encode(doc["question"]).ids
    naive = []
    for choice in doc["choices"]:
      whole = tok.encode(doc["question"] + " " + choice).ids  # the harness: encode the whole, split at the context
      logp, greedy = naive_logprobs(cfg, params, whole)
      n = len(whole) - len(ctx)
      naive.append((logp[-n:].sum(), bool(greedy[-n:].all())))
    got = [r[0] for r in item["resps"]]
    np.testing.assert_allclose([g[0] for g in got], [s for s, _ in naive], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [g for _, g in naive]
    correct.append(int(np.argmax([s for s, _ in naive])) == doc["answer"])
  assert len(correct) == len(MC)  # every question was scored and checked
  assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_rolling_loglikelihood_follows_the_harness_windows(paper_run):
  cfg, params, tok = paper_run["cfg"], paper_run["params"], paper_run["tok"]
  lm = adapter.JaxReplayLM(paper_run["run"], batch_size=4)
  results = adapter.run_tasks(lm, ["tiny_ppl"], include_path=paper_run["tasks"], log_samples=True)
  docs = [json.loads(l)["text"] for l in open(os.path.join(paper_run["tasks"], "docs.jsonl"))]
  L = SEQ_LEN
  assert sorted(samples_by_doc(results, "tiny_ppl")) == list(range(len(docs))) == [0, 1, 2]  # the loop checks all
  for i, sample in samples_by_doc(results, "tiny_ppl").items():
    ids = tok.encode(docs[i]).ids
    # The first L tokens follow the prefix (the dataset-id token); each later chunk of up to L tokens is scored
    # with the L tokens before its end as input (LM.loglikelihood_rolling's docstring).
    total = naive_logprobs(cfg, params, [3] + ids[:L])[0].sum()
    done = min(L, len(ids))
    while done < len(ids):
      end = min(done + L, len(ids))
      total += naive_logprobs(cfg, params, ids[end - L - 1:end])[0][-(end - done):].sum()
      done = end
    assert sample["resps"][0][0] == pytest.approx(total, rel=1e-5)
  assert len(tok.encode(docs[2]).ids) > 2 * L  # the long document did take several windows


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(paper_run):
  cfg, params, tok = paper_run["cfg"], paper_run["params"], paper_run["tok"]
  lm = adapter.JaxReplayLM(paper_run["run"], batch_size=2)
  results = adapter.run_tasks(lm, ["tiny_gen"], limit=2, include_path=paper_run["tasks"], log_samples=True)
  assert sorted(samples_by_doc(results, "tiny_gen")) == [0, 1]  # the loop checks both generations
  for i, sample in samples_by_doc(results, "tiny_gen").items():
    ids = tok.encode(TEXTS[i][:20]).ids
    for _ in range(6):  # naive greedy: a full forward pass per token
      nxt = int(naive_logits(cfg, params, ids)[-1].argmax())
      if nxt == lm.eot_token_id:
        break
      ids.append(nxt)
    text = tok.decode(ids[len(tok.encode(TEXTS[i][:20]).ids):])
    assert sample["resps"][0][0] == text.split(".")[0]


def test_jaxreplay_eval_writes_the_run_and_the_sweep_table(paper_run):
  out = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "eval", f"--workdir={paper_run['run']}",
                        "--tasks=tiny_mc,tiny_ppl", "--limit=2", f"--include_path={paper_run['tasks']}"],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  saved = json.load(open(os.path.join(paper_run["run"], "lm_eval.json")))
  assert set(saved["scores"]) == {"tiny_mc", "tiny_ppl"} and "acc" in saved["scores"]["tiny_mc"]
  db = sqlite3.connect(os.path.join(paper_run["root"], "sweep", "results.sqlite"))
  rows = dict(((t, m), v) for n, t, m, v in db.execute("SELECT name, task, metric, value FROM lm_eval")
              if n == "pretrain/tiny")
  assert rows[("tiny_mc", "acc")] == saved["scores"]["tiny_mc"]["acc"]
  assert rows[("tiny_ppl", "word_perplexity")] == pytest.approx(saved["scores"]["tiny_ppl"]["word_perplexity"])
  assert lm_eval_run.sweep_of(paper_run["run"]) == (os.path.join(paper_run["root"], "sweep"), "pretrain/tiny")


def test_eval_errors_are_one_sentence_with_exit_status_2(tmp_path):
  no_model = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "eval", f"--workdir={tmp_path}",
                             "--tasks=tiny_mc"], capture_output=True, text=True, timeout=600)
  assert no_model.returncode == 2 and "holds no model to evaluate" in no_model.stderr
  assert "Traceback" not in no_model.stderr


@pytest.mark.slow  # indexes the harness's ~15,000 built-in tasks: most of a minute
def test_an_unknown_task_is_one_sentence(paper_run):
  out = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "eval", f"--workdir={paper_run['run']}",
                        "--tasks=no_such_task_xyz"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 2 and "Unknown lm-eval task(s) no_such_task_xyz" in out.stderr


def test_evaluator_hook_scores_tasks_at_an_evaluation(paper_run):
  c = config_lib.default()
  c.eval.update(lm_eval_tasks="tiny_mc", lm_eval_limit=2, lm_eval_include_path=paper_run["tasks"], batch_size=4)
  evaluate = adapter.evaluator_for(c, paper_run["cfg"], 3, os.path.join(paper_run["run"], "tokenizer.json"))
  got = evaluate(paper_run["params"])
  lm = adapter.JaxReplayLM(paper_run["run"])
  want = adapter.run_tasks(lm, ["tiny_mc"], limit=2, include_path=paper_run["tasks"])
  assert got == {"lm_eval/tiny_mc/acc": want["results"]["tiny_mc"]["acc,none"]}


def test_the_instruct_mcq_scoring_equals_a_harness_task_on_the_same_items(tmp_path):
  """mcq.evaluate (the instruct experiment's MMLU/ARC/CSQA scorer) and the harness task write_mcq_task makes
  give the same per-choice scores and accuracy on an imported Llama; both match torch's forward pass."""
  import torch
  import transformers
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sweeps"))
  import _tiny_llama as tiny_llama  # the :small instruct sweep's checkpoint builder
  paths = tiny_llama.ensure(str(tmp_path))
  tok = chat_data.load_tokenizer(paths["model"])
  scorer = adapter.load_scorer(paths["model"], max_length=256)
  items = mcq.read_benchmark(paths["bench"]) * 2
  items[2] = dict(items[2], answer=1)  # a wrong answer somewhere: accuracy is not trivially 0 or 1
  want = mcq.evaluate(scorer.cfg, scorer.params, tok, items, batch_size=4)
  adapter.write_mcq_task(items, tok, str(tmp_path / "tasks"), "tiny_bench")
  lm = adapter.JaxReplayLM(scorer=scorer, batch_size=4, encode_separately=True)
  results = adapter.run_tasks(lm, ["tiny_bench"], include_path=str(tmp_path / "tasks"), log_samples=True)
  by_doc = samples_by_doc(results, "tiny_bench")
  got = np.concatenate([[r[0][0] for r in by_doc[i]["resps"]] for i in range(len(items))])
  np.testing.assert_allclose(got, want["scores"], rtol=1e-5, atol=1e-5)
  assert results["results"]["tiny_bench"]["acc,none"] == pytest.approx(want["accuracy"])
  model = transformers.AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
  rows, _ = mcq.encode(tok, items)
  with torch.no_grad():
    ref = [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)[
        torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].sum().item() for ids, start in rows]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_a_run_with_eval_lm_eval_tasks_logs_the_scores_at_every_evaluation(paper_run, tmp_path):
  data = str(tmp_path / "data")
  write_token_dir(data, (t for t in TEXTS * 40), os.path.join(paper_run["run"], "tokenizer.json"), dataset_id=3,
                  is_valid=every_kth(0.2), progress=False)
  c = config_lib.default()
  c.data.path = data
  c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=SEQ_LEN, vocab_size=300)
  c.optim.update(batch_size=4, lr=1e-2, warmup_tokens=64)
  c.eval.update(every_tokens=4 * SEQ_LEN * 3, tokens=256, batch_size=4, lm_eval_tasks="tiny_mc", lm_eval_limit=2,
                lm_eval_include_path=paper_run["tasks"])
  c.checkpoint.update(every_steps=100, every_minutes=0.0, async_save=False)
  c.log.update(every_steps=3, progress=False)
  c.stop.update(steps=3)
  workdir = str(tmp_path / "run")
  loop.run(c, workdir)
  evals = [r for r in read_metrics(workdir) if "valid_ntp" in r]
  assert len(evals) >= 2 and all(0.0 <= r["lm_eval/tiny_mc/acc"] <= 1.0 for r in evals)
  lm = adapter.JaxReplayLM(workdir)  # the exported (final) weights score as the last evaluation did
  want = adapter.run_tasks(lm, ["tiny_mc"], limit=2, include_path=paper_run["tasks"])
  assert evals[-1]["lm_eval/tiny_mc/acc"] == want["results"]["tiny_mc"]["acc,none"]
