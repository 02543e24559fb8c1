"""Toy continual learning: the four tasks, their token directories, greedy exact-match accuracy, replay
prompted by several task ids, and a two-task chain through train.run."""
import json
import math
import os

import jax
import numpy as np
import pytest

from jaxreplay import config as config_lib
from jaxreplay.replay import self_generated as replay_self
from jaxreplay import sharding
from jaxreplay.evals import toy
from jaxreplay.data import loader
from jaxreplay.models import decoder, export as export_lib
from jaxreplay.models import sampler
from jaxreplay.train import loop

TINY = decoder.ModelConfig(d_model=32, n_layers=2, head_dim=16, seq_len=toy.SEQ_LEN, vocab_size=toy.VOCAB_SIZE)


def test_answers_of_each_task():
  a, b = np.array([123, 999, 302, 7]), np.array([456, 2, 0, 995])
  np.testing.assert_array_equal(toy.answer_digits("add", a, b), [[0, 5, 7, 9], [1, 0, 0, 1], [0, 3, 0, 2],
                                                                 [1, 0, 0, 2]])
  np.testing.assert_array_equal(toy.answer_digits("modadd", a, b), [[0, 5, 7, 9], [0, 0, 0, 1], [0, 3, 0, 2],
                                                                    [0, 0, 0, 2]])
  np.testing.assert_array_equal(toy.answer_digits("reversal", a, b), [[0, 3, 2, 1], [0, 9, 9, 9], [0, 2, 0, 3],
                                                                      [0, 7, 0, 0]])
  np.testing.assert_array_equal(toy.answer_digits("sort", a, b), [[0, 1, 2, 3], [0, 9, 9, 9], [0, 0, 2, 3],
                                                                  [0, 0, 0, 7]])
  with pytest.raises(ValueError, match="unknown toy task"):
    toy.answer_digits("mul", a, b)


def test_example_layout():
  rng = np.random.default_rng(0)
  for i, task in enumerate(toy.TASKS):
    x = toy.examples(task, 500, rng)
    assert x.shape == (500, 14) and x.dtype == np.int32
    assert np.all(x[:, 0] == i) and np.all(x[:, 4] == toy.SEP) and np.all(x[:, 8] == toy.EQ)
    assert np.all(x[:, 13] == toy.EOS)
    assert np.all((x[:, 1:4] >= toy.DIGIT0) & (x[:, 1:4] < toy.VOCAB_SIZE))
    assert np.all((x[:, 9:13] >= toy.DIGIT0) & (x[:, 9:13] < toy.VOCAB_SIZE))
    if task in ("reversal", "sort"):
      assert np.all(x[:, 5:8] == toy.NULL) and np.all(x[:, 9] == toy.DIGIT0)  # left-padded with 0
    else:
      assert np.all(x[:, 5:8] >= toy.DIGIT0)
    # the answer follows from the operands
    a = ((x[:, 1:4] - toy.DIGIT0) * [100, 10, 1]).sum(1)
    b = ((x[:, 5:8] - toy.DIGIT0) * [100, 10, 1]).sum(1) if task in ("add", "modadd") else 0 * a
    np.testing.assert_array_equal(x[:, 9:13] - toy.DIGIT0, toy.answer_digits(task, a, b))
  with pytest.raises(ValueError, match="unknown toy task"):
    toy.examples("mul", 1, rng)


def test_token_dirs_give_the_examples_as_rows(tmp_path):
  dirs = toy.build(str(tmp_path / "toy"), train_examples=64, valid_examples=16, seed=3)
  assert list(dirs) == list(toy.TASKS)
  meta = json.load(open(os.path.join(dirs["sort"], "meta.json")))
  assert meta["dataset_id"] == 2 and meta["vocab_size"] == 19 and meta["toy"]["task"] == "sort"
  train = np.fromfile(os.path.join(dirs["sort"], "train.bin"), np.uint16).reshape(-1, 14)
  batches = loader.TrainBatches(dirs["sort"], 14, 8, seed=0, dataset_id=-1, prefetch=0)
  rows = np.concatenate([batches.batch(s) for s in range(8)])  # one epoch of 64 rows
  assert {tuple(r) for r in rows} == {tuple(r) for r in train.astype(np.int32)}
  assert np.all(rows[:, 0] == 2)  # the loader's dataset id is the task token
  mtime = os.path.getmtime(os.path.join(dirs["add"], "train.bin"))
  assert toy.build(str(tmp_path / "toy"), 64, 16, seed=3) == dirs  # kept, not rewritten
  assert os.path.getmtime(os.path.join(dirs["add"], "train.bin")) == mtime
  other = np.fromfile(os.path.join(toy.build(str(tmp_path / "toy"), 64, 16, seed=4)["add"], "train.bin"), np.uint16)
  assert other.size == 64 * 14 and not np.array_equal(other.reshape(-1, 14), train)


def test_exact_match_counts_only_fully_correct_answers():
  x = toy.examples("add", 6, np.random.default_rng(0))
  logits = jax.nn.one_hot(np.concatenate([x[:, 1:], x[:, :1]], axis=1), toy.VOCAB_SIZE) * 5.0
  assert np.asarray(toy.exact_match(logits, x)).all()
  bad = logits.at[1, 12].set(jax.nn.one_hot(toy.PAD, toy.VOCAB_SIZE) * 9.0)  # wrong EOS
  bad = bad.at[3, 8].set(jax.nn.one_hot(toy.DIGIT0 + 9, toy.VOCAB_SIZE) * 9.0)  # wrong first digit (if not 9)
  bad = bad.at[4, 3].set(jax.nn.one_hot(toy.PAD, toy.VOCAB_SIZE) * 9.0)  # a prompt position: not scored
  got = np.asarray(toy.exact_match(bad, x))
  assert not got[1] and got[0] and got[2] and got[4] and got[5]
  assert got[3] == (x[3, 9] == toy.DIGIT0 + 9)


def _params(seed):
  return decoder.init_params(TINY, jax.random.key(seed))


def test_accuracy_equals_greedy_decoding_with_the_sampler():
  """Rows whose answer is the sampler's own greedy continuation score 1; one changed answer token scores 0."""
  params = jax.tree.map(lambda p: p * 3.0, _params(0))  # sharper logits: decisive argmaxes
  prompts = np.concatenate([toy.examples(t, 16, np.random.default_rng(i))[:, :toy.PROMPT_LEN]
                            for i, t in enumerate(toy.TASKS)])
  greedy = np.asarray(sampler.sample(TINY, params, prompts, jax.random.key(0), length=14,
                                      sc=sampler.SamplingConfig(temperature=0.0)))
  wrong = greedy.copy()
  wrong[::2, 11] = (wrong[::2, 11] - toy.DIGIT0 + 1) % 10 + toy.DIGIT0  # other digit at answer position 3
  wrong[::2, 11] = np.where(greedy[::2, 11] < toy.DIGIT0, toy.DIGIT0, wrong[::2, 11])
  ev = toy.AccuracyEvaluator(TINY, {"greedy": greedy, "wrong": wrong}, batch_size=24)  # 64 = 2 full + 1 partial
  acc = ev(params)
  assert acc["acc_greedy"] == 1.0
  assert acc["acc_wrong"] == 0.5


def test_self_generated_replay_splits_rows_among_prompt_ids(tmp_path):
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=14, vocab_size=19)
  c.init["from"] = str(tmp_path / "prev")
  c.replay.update(method="ntp", source="self", batch_size=6, buffer=2, prompt_ids="0,1,2")
  mesh, prev = sharding.make_mesh(c.mesh), c.init["from"]
  source = replay_self.SelfGeneratedReplay(c, mesh, TINY, _params(1), 2, prev)  # 2: the pretraining data's id
  for s in range(3):
    b = np.asarray(source.next(s)[0])
    np.testing.assert_array_equal(b[:, 0], [0, 0, 1, 1, 2, 2])
  fake_export(tmp_path / "prev")
  assert source.fingerprint(c)["sampling"]["prompt_ids"] == [0, 1, 2]
  c.replay.update(batch_size=4, buffer=3)  # 12 rows per refill again: the same compiled sampler
  uneven = replay_self.SelfGeneratedReplay(c, mesh, TINY, _params(1), 2, prev)
  np.testing.assert_array_equal(np.asarray(uneven.next(0)[0])[:, 0], [0, 0, 1, 2])
  c.replay.prompt_ids = ""
  single = replay_self.SelfGeneratedReplay(c, mesh, TINY, _params(1), 2, prev)
  assert np.all(np.asarray(single.next(0)[0])[:, 0] == 2)  # unset: the pretraining data's id, as before


def fake_export(workdir):
  """Just enough of an export for the fingerprint, which reads the export's info and config."""
  export = workdir / "export"
  export.mkdir(parents=True, exist_ok=True)
  (export / "config.json").write_text("{}")
  (export / "info.json").write_text(json.dumps(dict(step=1, dataset_id=2)))


@pytest.mark.slow  # two stages through train.run with sampling: ~30 s alone, minutes on a busy 2-core CPU
def test_two_task_chain_with_replay_logs_accuracy_on_every_task(tmp_path):
  dirs = toy.build(str(tmp_path / "data"), train_examples=256, valid_examples=32)
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=14, vocab_size=19)
  c.data.path = dirs["add"]
  c.optim.update(batch_size=16, lr=3e-3, warmup_tokens=16 * 14)
  c.eval.update(every_tokens=4 * 16 * 14, tokens=32 * 14, batch_size=16)
  c.checkpoint.update(every_steps=100, every_minutes=0.0, async_save=False)
  c.log.update(every_steps=4, progress=False)
  c.stop.steps = 8
  first = loop.run(c, str(tmp_path / "add"))
  assert set(toy.TASKS) <= {k[4:] for k in first if k.startswith("acc_")}
  c.stage, c.data.path, c.init["from"] = "finetune", dirs["reversal"], str(tmp_path / "add")
  c.replay.update(method="ntp", source="self", coeff=10.0, batch_size=16, buffer=2, prompt_ids="0")
  second = loop.run(c, str(tmp_path / "reversal"))
  # Each logged accuracy is greedy decoding from the prompts, redone here with the sampler on the export.
  params = export_lib.load_exported(str(tmp_path / "reversal"))
  cfg = decoder.ModelConfig.from_config(c.model)
  for t in toy.TASKS:
    rows = np.fromfile(os.path.join(dirs[t], "valid.bin"), np.uint16).reshape(-1, 14)[:32].astype(np.int32)
    greedy = np.asarray(sampler.sample(cfg, params, rows[:, :toy.PROMPT_LEN], jax.random.key(0), length=14,
                                        sc=sampler.SamplingConfig(temperature=0.0)))
    assert second[f"acc_{t}"] == pytest.approx((greedy == rows).all(axis=1).mean()), t
  assert "train_reg" in [k for r in open(tmp_path / "reversal" / "metrics.jsonl") for k in json.loads(r)]
  assert second["step"] == 8 and math.isfinite(second["prev_ntp"])
