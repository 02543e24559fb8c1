"""The trainer on chat data (the instruct finetune) with a tiny random Llama made here: chat masks, MCQ scoring,
BOS-prompted self-generated replay, end-to-end runs through train.run."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from jaxreplay import config as config_lib, sharding
from jaxreplay.data import chat as chat_data
from jaxreplay.replay import self_generated
from jaxreplay.train import loop as train
from jaxreplay.evals import mcq
from jaxreplay.models import hf_import

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sweeps"))
import _tiny_llama as tiny_llama  # noqa: E402 (the :small instruct sweep's checkpoint builder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  pytest.importorskip("torch", reason="the tiny Llama checkpoint is made with torch (pip install torch)")
  pytest.importorskip("transformers", reason="checkpoints and chat templates need transformers")
  directory = str(tmp_path_factory.mktemp("tiny_llama"))
  model = tiny_llama.make_checkpoint(directory)
  return directory, model, chat_data.load_tokenizer(directory)


def test_chat_mask_covers_exactly_the_assistant_tokens(checkpoint):
  _, _, tok = checkpoint
  msgs = [dict(role="user", content="A four bit counter."), dict(role="assistant", content="module counter; endmodule")]
  ids, mask = chat_data.encode_chat(tok, msgs)
  assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
  assert ids[0] == tok.bos_token_id
  assistant = [i for i, m in zip(ids, mask) if m]
  assert tok.decode(assistant) == "module counter; endmodule<|eot_id|>"
  first = mask.index(True)
  assert tok.decode(ids[:first]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert all(mask[first:]) and not any(mask[:first])
  # Two assistant turns: both masked, the user turn between them not.
  msgs2 = msgs + [dict(role="user", content="again"), dict(role="assistant", content="ok")]
  ids2, mask2 = chat_data.encode_chat(tok, msgs2)
  assert tok.decode([i for i, m in zip(ids2, mask2) if m]) == "module counter; endmodule<|eot_id|>ok<|eot_id|>"


def test_packing_keeps_examples_whole_with_segments():
  enc = [([1, 2, 3], [False, True, True]), ([4, 5], [False, True]), ([6] * 9, [True] * 9), ([7] * 12, [True] * 12)]
  p = chat_data.pack(enc, 8, pad_id=0)
  assert p.tokens.tolist()[0] == [1, 2, 3, 4, 5, 0, 0, 0]
  assert p.segments.tolist()[0] == [1, 1, 1, 2, 2, 0, 0, 0]
  assert p.mask.tolist()[0] == [False, True, True, False, True, False, False, False]
  assert p.stats["truncated"] == 2 and len(p) == 3
  assert chat_data.pack(enc, 8, 0, long="drop").stats["dropped"] == 2
  b = chat_data.Batches(dict(x=np.arange(5)), 2, seed=0)
  seen = np.concatenate([b.batch(s)["x"] for s in range(5)])
  assert sorted(seen[:5].tolist()) == list(range(5)) and sorted(seen[5:].tolist()) == list(range(5))
  assert (b.batch(3)["x"] == chat_data.Batches(dict(x=np.arange(5)), 2, seed=0).batch(3)["x"]).all()


def _torch_score(model, ids, start):
  import torch
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
  return sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def test_mcq_scores_match_torch_and_accuracy_follows_them(checkpoint, tmp_path):
  directory, model, tok = checkpoint
  items = [dict(question="Which is a counter?", choices=["module", "fox", "dog", "clk"], answer=0),
           dict(question="Pick one.", choices=["A B", "lazy"], answer="B"),
           dict(question="The quick brown?", choices=["fox", "dog", "q"], answer=2)]
  path = tmp_path / "bench.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in items))
  read = mcq.read_benchmark(str(path))
  assert [x["answer"] for x in read] == [0, 1, 2]
  cfg, params, _ = hf_import.load(directory, seq_len=128)
  rows, n_choices = mcq.encode(tok, read)
  assert n_choices == [4, 2, 3]
  assert tok.decode(rows[1][0][rows[1][1]:]) == "ANSWER: B"
  res = mcq.evaluate(cfg, params, tok, read, batch_size=4)
  ref = np.array([_torch_score(model, ids, start) for ids, start in rows])
  np.testing.assert_allclose(res["scores"], ref, atol=2e-3)
  # Answer keys set from the torch scores: all right with the best choice, all wrong with the worst.
  best, worst, at = [], [], 0
  for k in n_choices:
    best.append(int(np.argmax(ref[at:at + k])))
    worst.append(int(np.argmin(ref[at:at + k])))
    at += k
  as_best = [dict(x, answer=b) for x, b in zip(read, best)]
  assert mcq.evaluate(cfg, params, tok, as_best, batch_size=4)["accuracy"] == 1.0
  assert mcq.evaluate(cfg, params, tok, [dict(x, answer=w) for x, w in zip(read, worst)])["accuracy"] == 0.0
  with pytest.raises(mcq.MCQError, match="does not name one of"):
    path.write_text(json.dumps(dict(question="q", choices=["a", "b"], answer="E")))
    mcq.read_benchmark(str(path))


def _write_data(tmp_path):
  tiny_llama.write_data(str(tmp_path))


def tiny_config(directory, tmp_path, **replay):
  c = config_lib.default()
  c.stage = "finetune"
  c.model.update(path=directory, seq_len=64)
  c.data.update(kind="chat", train=str(tmp_path / "chat.jsonl"), valid_fraction=0.25,
                prompt_template="Write the following Verilog program. {prompt}")
  c.optim.update(lr=3e-3, warmup_tokens=64, batch_size=4)
  c.stop.update(steps=4)
  c.eval.update(every_steps=4, batch_size=4, replay_rows=4, mcq=f"toy:{tmp_path / 'bench.jsonl'}")
  c.replay.update(batch_size=2, buffer=2, **replay)
  c.checkpoint.update(every_steps=100, every_minutes=0.0, async_save=False)
  c.log.update(every_steps=1, progress=False)
  return c


def test_end_to_end_kl_self_replay_finetune(checkpoint, tmp_path):
  directory, _, tok = checkpoint
  _write_data(tmp_path)
  c = tiny_config(directory, tmp_path, method="kl", source="self", coeff=1.0)
  c.export.hf = True
  result = train.run(c, str(tmp_path / "run"))
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in rows if r["step"] == 1)
  assert abs(first["train_reg"]) < 1e-5  # the trained copy starts equal to the frozen model
  steps_logged = [r for r in rows if "train_reg" in r and not r.get("final")]
  assert len(steps_logged) == 4 and max(r["train_reg"] for r in steps_logged) > 1e-6
  for r in steps_logged:  # the objective adds coeff (1) × KL(π_pre ‖ π_θ) ≥ 0 to the next-token loss
    assert r["train_reg"] >= -1e-6 and r["train_loss"] == pytest.approx(r["train_ntp"] + r["train_reg"], rel=1e-5)
  assert rows[0]["step"] == 0 and abs(rows[0]["self_kl"]) < 1e-5 and "mcq_toy" in rows[0]
  assert result["step"] == 4 and result["train_step_compiles"] == 1
  assert result["valid_ntp"] < rows[0]["valid_ntp"]  # it learned the downstream data
  assert result["self_kl"] > 0 and "mcq_mean" in result and result["stop_reason"] == "length"
  assert {"mfu", "tokens_per_s"} <= set(first) and 0 <= result["valid_acc"] <= 1  # what the paper stage logs
  stats = json.load(open(tmp_path / "run" / "data_stats.json"))
  assert stats["train"]["examples"] == 18 and stats["valid"]["examples"] == 6
  # The exported Hugging Face checkpoint loads back and differs from the original.
  cfg, again, _ = hf_import.load(str(tmp_path / "run" / "hf"), seq_len=64)
  _, orig, _ = hf_import.load(directory, seq_len=64)
  assert float(abs(again["embed"] - orig["embed"]).max()) > 0
  assert train.run(c, str(tmp_path / "run")) == json.load(open(tmp_path / "run" / "final.json"))


def test_self_replay_rows_start_from_bos_and_run_full_length(checkpoint):
  directory, _, tok = checkpoint
  cfg, params, _ = hf_import.load(directory, seq_len=32)
  c = config_lib.default()
  c.model.seq_len = 32
  c.replay.update(method="kl", batch_size=2, buffer=2)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  make = lambda: self_generated.SelfGeneratedReplay(c, mesh, cfg, params, tok.bos_token_id, directory)
  src = make()
  a, b, c2 = (np.asarray(src.next(s)[0]) for s in range(3))
  assert a.shape == (2, 32) and (a[:, 0] == tok.bos_token_id).all()
  assert not (a == b).all() and not (a == c2).all()
  assert (np.asarray(make().next(2)[0]) == c2).all()  # a pure function of the step
  assert (a[:, 1:] != tok.pad_token_id).mean() > 0.9  # sampled to the end (no EOS stop)


def test_bad_configs_fail_with_one_sentence(tmp_path):
  directory = str(tmp_path / "model")  # validation reads no files
  _write_data(tmp_path)
  c = tiny_config(directory, tmp_path, method="kl", source="real")
  with pytest.raises(config_lib.ConfigError, match="replay.path"):
    config_lib.validate(c)
  c = tiny_config(directory, tmp_path, method="kl", source="self")
  c.train.microbatches = 3
  with pytest.raises(config_lib.ConfigError, match="does not divide"):
    config_lib.validate(c)
  c = tiny_config(directory, tmp_path)
  c.eval.mcq = "nocolon"
  with pytest.raises(config_lib.ConfigError, match="NAME:PATH"):
    config_lib.validate(c)
  c = tiny_config(directory, tmp_path)
  c.data.kind = "tokens"
  with pytest.raises(config_lib.ConfigError, match="data.kind='chat'"):
    config_lib.validate(c)
  c = tiny_config(directory, tmp_path, method="replace", coeff=0.5)
  with pytest.raises(config_lib.ConfigError, match="for token data"):
    config_lib.validate(c)
  with pytest.raises(chat_data.ChatDataError, match="neither"):
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(q="x")))
    chat_data.read_jsonl(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("text,message", [(None, "does not exist"), ('\n{oops\n', r":2 is not valid JSON"),
                                          ("[1, 2]\n", r":1 is not a JSON object"),
                                          ('{"question": "x"}\n', r":1 is not a JSON object with question")])
def test_bad_json_lines_name_the_file_and_line(tmp_path, text, message):
  path = tmp_path / "bench.jsonl"
  if text is not None:
    path.write_text(text)
  with pytest.raises(mcq.MCQError, match=message):
    mcq.read_benchmark(str(path))
  with pytest.raises(chat_data.ChatDataError, match=message.replace(" with question", "|neither")):
    chat_data.read_jsonl(str(path))


def test_dataset_converters_follow_the_paper_filters():
  from jaxreplay.data import instruct_sources as idata
  meta = "{'description': 'A four bit counter with reset.', 'rank': '12', 'compile_status': 'No error!'}"
  assert idata.pyranet_example(dict(description=meta, code="module c; endmodule")) == dict(
      prompt="A four bit counter with reset.", response="module c; endmodule")
  failing = meta.replace("No error!", "Dependency issues")
  assert idata.pyranet_example(dict(description=failing, code="module c; endmodule")) is None
  assert idata.pyranet_example(dict(description=meta.replace("A four bit counter with reset.", "short"),
                                    code="module c; endmodule")) is None
  assert idata.pyranet_example(dict(description=meta, code="wire x;")) is None
  arc = dict(question="q", choices=dict(label=["1", "2", "3"], text=["a", "b", "c"]), answerKey="2")
  assert idata.mcq_item(arc, "keyed") == dict(question="q", choices=["a", "b", "c"], answer=1)
  assert idata.mcq_item(dict(question="q", choices=["a", "b"], answer=1), "mmlu")["answer"] == 1


def test_resumed_chat_run_equals_uninterrupted_ci_size(checkpoint, tmp_path):
  """CI size of the one below: stopped after 1 of 2 steps (self-generated KL replay, a buffer of 2 rows used one
  per step, so the resumed step takes the buffer's second row) and resumed, it ends where a 2-step run does."""
  directory, _, _ = checkpoint
  _write_data(tmp_path)
  c = tiny_config(directory, tmp_path, method="kl", source="self", coeff=1.0)
  c.replay.update(batch_size=1, buffer=2)
  c.stop.steps = 2
  c.checkpoint.every_steps = 1
  c.eval.update(every_steps=2, mcq="")
  full = train.run(c, str(tmp_path / "full"))
  c.stop.steps = 1
  train.run(c, str(tmp_path / "cut"))
  os.remove(tmp_path / "cut" / "final.json")  # as if it had been preempted after its step-1 checkpoint
  os.remove(tmp_path / "cut" / "config.json")
  c.stop.steps = 2
  resumed = train.run(c, str(tmp_path / "cut"))
  assert resumed["step"] == full["step"] == 2
  for k in ("valid_ntp", "self_kl"):
    assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k
  second = [[r for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if r["step"] == 2 and "train_loss" in r]
            for d in ("full", "cut")]
  assert len(second[0]) == len(second[1]) == 1  # the resumed run logs step 2 once
  assert second[1][0]["train_loss"] == pytest.approx(second[0][0]["train_loss"], rel=1e-5)
  assert full["self_kl"] > 1e-6  # one step moved the model off π_pre: the KL compared is not zero on both


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(checkpoint, tmp_path):
  """Stopped after 2 steps and resumed to 4, a run ends where an uninterrupted 4-step run does."""
  directory, _, _ = checkpoint
  _write_data(tmp_path)
  c = tiny_config(directory, tmp_path, method="kl", source="self", coeff=1.0)
  c.checkpoint.every_steps = 2
  full = train.run(c, str(tmp_path / "full"))
  c.stop.steps = 2
  train.run(c, str(tmp_path / "cut"))
  os.remove(tmp_path / "cut" / "final.json")  # as if it had been preempted after its step-2 checkpoint
  os.remove(tmp_path / "cut" / "config.json")
  c.stop.steps = 4
  resumed = train.run(c, str(tmp_path / "cut"))
  for k in ("valid_ntp", "self_kl", "mcq_mean"):
    assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7)
  with pytest.raises(config_lib.ConfigError, match="different config"):
    c.optim.lr = 1.0
    train.run(c, str(tmp_path / "cut"))
