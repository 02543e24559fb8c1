"""End-to-end training stages on tiny models and tiny learnable token files."""
import os

import numpy as np
import pytest

from jaxreplay.io import read_metrics
from jaxreplay import config as config_lib
from jaxreplay.train import loop as train
from jaxreplay.data import DataError

from helpers import tiny_config, token_dir, two_datasets


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return two_datasets(root)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("runs") / "pre")
  result = train.run(tiny_config(data["a"], steps=60), workdir)
  return workdir, result


def test_pretraining_learns_logs_and_exports(pretrained):
  workdir, result = pretrained
  rows = read_metrics(workdir)
  evals = [r["valid_ntp"] for r in rows if "valid_ntp" in r and not r.get("final")]
  assert evals[0] > np.log(64) - 0.5  # starts near uniform
  assert result["valid_ntp"] < evals[0] - 1.0  # and learns the Markov structure
  assert result["step"] == 60 and result["tokens"] == 60 * 8 * 16
  assert result["train_step_compiles"] == 1
  assert {"tokens_per_s", "mfu", "lr", "train_loss", "valid_ntp_h2"} <= set().union(*rows)
  for f in ("config.json", "final.json", "tokenizer.json", "export/info.json", "export/config.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  # A finished run returns its result without training again.
  again = train.run(tiny_config(rows and config_lib.from_json_file(os.path.join(workdir, "config.json")).data.path,
                                steps=60), workdir)
  assert again["valid_ntp"] == result["valid_ntp"]


def test_workdir_with_other_config_is_refused(pretrained, data):
  workdir, _ = pretrained
  before = sorted(os.listdir(workdir))
  c = tiny_config(data["a"], steps=60)
  c.optim.lr = 0.5
  with pytest.raises(config_lib.ConfigError, match="holds a run with a different config .*optim.lr"):
    train.run(c, workdir)
  assert sorted(os.listdir(workdir)) == before


def test_stop_by_tokens_per_param_and_epochs(data, tmp_path):
  c = tiny_config(data["a"], epochs=0.5)
  stage = train.Stage(config_lib.validate(c), str(tmp_path / "e"))
  assert stage.total_steps == round(0.5 * stage.batches.tokens_per_epoch / (8 * 16))
  c = tiny_config(data["a"], tokens_per_param=0.1)
  stage = train.Stage(c, str(tmp_path / "t"))
  assert stage.total_steps == round(0.1 * stage.counts["paper"] / (8 * 16))


def test_target_loss_stops_early(data, tmp_path):
  c = tiny_config(data["a"], steps=200)
  c.stop.target_loss = 3.6
  result = train.run(c, str(tmp_path / "target"))
  assert result["stop_reason"] == "target_loss"
  assert result["valid_ntp"] <= 3.6 and result["step"] < 200


def test_bad_data_is_one_clear_error(data, tmp_path):
  c = tiny_config(data["a"])
  c.model.vocab_size = 40  # the file holds ids up to 63
  with pytest.raises(DataError, match="vocab"):
    train.run(c, str(tmp_path / "v"))
  small = token_dir(tmp_path / "small", train_tokens=100, valid_tokens=2000)
  with pytest.raises(DataError):
    train.run(tiny_config(small), str(tmp_path / "s"))
  with pytest.raises(DataError):
    train.run(tiny_config(str(tmp_path / "missing")), str(tmp_path / "m"))


def test_finetune_with_real_kl_replay_forgets_less(pretrained, data, tmp_path):
  pre, pre_result = pretrained
  out = {}
  for method in ("none", "kl"):
    c = tiny_config(data["b"], steps=40)
    c.stage = "finetune"
    c.init["from"] = pre
    c.replay.update(method=method, source="real", coeff=3.0)
    out[method] = train.run(c, str(tmp_path / method))
  none, kl = out["none"], out["kl"]
  assert none["prev_ntp"] > pre_result["valid_ntp"] + 0.3  # plain finetuning forgets
  assert kl["prev_ntp_delta"] < 0.5 * none["prev_ntp_delta"]
  assert kl["prev_kl"] < none["prev_kl"]
  assert 0 <= none["compute_multiplier"] <= kl["compute_multiplier"] <= 1
  assert none["drift_ratio"] > 0
  assert kl["train_step_compiles"] == 1


def test_cli_finetune_takes_init_from_and_reports_errors_in_one_line(pretrained, data, tmp_path):
  import subprocess
  import sys
  pre, _ = pretrained
  base = [sys.executable, "-m", "jaxreplay.cli", "finetune", "--config=sweeps/quickstart.py:finetune",
          f"--config.data.path={data['b']}", f"--workdir={tmp_path / 'ft'}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # init.from names a directory with no finished run: one sentence, exit status 2, nothing written.
  r = subprocess.run(base + [f"--config.init.from={tmp_path / 'nowhere'}"], cwd=root, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().count("\n") == 0 and "init.from" in r.stderr and "nowhere" in r.stderr
  r = subprocess.run(base + ["--config.model.d_modle=3"], cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "d_modle" in r.stderr


def test_self_kl_replay_with_sampled_teacher_equals_forward_and_resumes_mid_buffer(pretrained, data, tmp_path):
  """Teacher logits kept from sampling train as the frozen forward pass does; stopped mid-buffer (step 6 of a
  4-batch buffer) and resumed, a run regenerates the refill with its logits and ends where an uninterrupted one
  does."""
  pre, _ = pretrained

  def config(teacher, steps=10):
    c = tiny_config(data["b"], steps=steps)
    c.stage = "finetune"
    c.init["from"] = pre
    c.replay.update(method="kl", source="self", coeff=3.0, buffer=4, teacher=teacher)
    c.log.every_steps = 1
    c.eval.at_start = False
    # The first steps start at π_pre, where the KL gradient is 0 with the forward teacher and rounding (~1e-9)
    # with the sampled one, which Adam scales up on weights only replay rows touch; lr 1e-2 then makes this
    # tiny model's trajectory chaotic. A smaller lr and a larger eps keep the comparison well conditioned.
    c.optim.update(lr=1e-3, eps=1e-6)
    return c

  def train_losses(workdir):
    return {r["step"]: (r["train_loss"], r["train_reg"]) for r in read_metrics(workdir) if "train_reg" in r}

  out = {t: train.run(config(t), str(tmp_path / t)) for t in ("forward", "sampled")}
  forward, sampled = train_losses(tmp_path / "forward"), train_losses(tmp_path / "sampled")
  assert sorted(sampled) == list(range(1, 11)) and sampled[10][1] > 1e-4
  for s in sampled:  # step 1 starts at π_pre: KL 0 with the forward teacher, ~1e-9 with the sampled one
    np.testing.assert_allclose(sampled[s], forward[s], rtol=1e-4, atol=1e-6)
  assert out["sampled"]["prev_kl"] == pytest.approx(out["forward"]["prev_kl"], rel=1e-3)
  assert out["sampled"]["train_step_compiles"] == 1
  assert (out["sampled"]["replay_teacher"], out["forward"]["replay_teacher"]) == ("sampled", "forward")

  cut = str(tmp_path / "cut")
  train.run(config("sampled", steps=6), cut)
  os.remove(os.path.join(cut, "final.json"))  # as if it had been preempted after its step-6 checkpoint
  os.remove(os.path.join(cut, "config.json"))
  resumed = train.run(config("sampled"), cut)
  after = train_losses(cut)
  for s in range(7, 11):
    assert after[s] == pytest.approx(sampled[s], rel=1e-6)
  for k in ("valid_ntp", "prev_ntp", "prev_kl"):
    assert resumed[k] == pytest.approx(out["sampled"][k], rel=1e-6)


def _finetune(pre, data_path, **replay):
  c = tiny_config(data_path, steps=20)
  c.stage = "finetune"
  c.init["from"] = pre
  c.replay.update(**replay)
  return c


def test_nan_loss_is_a_training_error_that_keeps_the_last_checkpoint(data, tmp_path):
  c = tiny_config(data["a"], steps=40)
  c.optim.update(lr=1e30, warmup_tokens=0)  # the first update overflows the weights
  c.checkpoint.every_steps = 1
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.TrainingError, match=r"became nan at step 5: lower optim.lr \(now 1e\+30\)"):
    train.run(c, workdir)
  assert not train.is_finished(workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] >= 1


def test_early_stop_after_evals_without_a_new_best(data, tmp_path):
  c = tiny_config(data["a"], steps=0)
  c.stop.early_stop_evals = 2
  c.optim.lr = 0.0  # the eval loss never improves on the first eval
  result = train.run(c, str(tmp_path / "early"))
  evals = [r["valid_ntp"] for r in read_metrics(str(tmp_path / "early")) if "valid_ntp" in r]
  # The eval at step 10 sets the best (the start eval does not count); 20 and 30 are the two without a new one.
  assert result["stop_reason"] == "early_stop" and result["step"] == 30
  assert len(set(evals)) == 1


def test_wall_time_stops_after_the_step_that_passes_it(data, tmp_path):
  c = tiny_config(data["a"], steps=0)
  c.stop.wall_time_s = 1e-9
  result = train.run(c, str(tmp_path / "wall"))
  assert result["stop_reason"] == "wall_time" and result["step"] == 1 and result["elapsed_s"] >= 1e-9


def test_mix_fraction_puts_the_second_dataset_into_every_training_batch(data, tmp_path):
  c = tiny_config(data["a"], steps=20)
  c.data.update(mix_path=data["b"], mix_fraction=0.25)
  stage = train.Stage(c, str(tmp_path / "stage"))
  for step in (0, 7, 19):
    assert (np.asarray(stage.batches.batch(step))[:, 0] == 1).sum() == 2  # 2 of 8 rows from b (dataset id 1)
  mixed = train.run(c, str(tmp_path / "mixed"))
  plain = train.run(tiny_config(data["a"], steps=20), str(tmp_path / "plain"))
  assert mixed["train_step_compiles"] == 1 and mixed["valid_ntp"] != plain["valid_ntp"]


def test_kl_downstream_holds_the_model_to_the_pretrained_one_on_downstream_rows(pretrained, data, tmp_path):
  pre, _ = pretrained
  none = train.run(_finetune(pre, data["b"], method="none"), str(tmp_path / "none"))
  kl = train.run(_finetune(pre, data["b"], method="kl_downstream", coeff=10.0), str(tmp_path / "kl"))
  rows = [r for r in read_metrics(str(tmp_path / "kl")) if "train_reg" in r]
  assert rows and all(r["train_reg"] >= 0 for r in rows)
  assert kl["prev_kl"] < 0.5 * none["prev_kl"] and kl["drift_ratio"] < none["drift_ratio"]


def test_lora_export_holds_merged_weights_that_a_finetune_starts_from(pretrained, data, tmp_path):
  pre, _ = pretrained
  c = _finetune(pre, data["b"])
  c.lora.update(rank=4, alpha=8.0)
  lora = train.run(c, str(tmp_path / "lora"))
  second = _finetune(str(tmp_path / "lora"), data["b"])
  second.stop.steps = 1
  train.run(second, str(tmp_path / "second"))
  start = next(r for r in read_metrics(str(tmp_path / "second")) if r["step"] == 0 and "valid_ntp" in r)
  assert start["valid_ntp"] == pytest.approx(lora["valid_ntp"], rel=1e-5)  # the export is the merged model
  assert start["prev_kl"] == pytest.approx(0.0, abs=1e-6)  # ... and the second run's π_pre
  assert lora["prev_kl"] > 1e-4  # LoRA did move the model


@pytest.mark.parametrize("metric,mode", [("valid_acc", "auto"), ("valid_ntp", "min")])
def test_stop_target_on_any_evaluated_metric(data, tmp_path, metric, mode):
  """stop.target_metric reads any metric of an evaluation: the run stops at the first eval that reaches it."""
  c = tiny_config(data["a"], steps=200)
  c.eval.every_steps = 5
  first = train.run(tiny_config(data["a"], steps=10), str(tmp_path / "probe"))  # where the metric is after 10
  c.stop.update(target_metric=metric, target=first[metric], target_mode=mode)
  workdir = str(tmp_path / metric)
  result = train.run(c, workdir)
  evals = [r for r in read_metrics(workdir) if metric in r and not r.get("final") and r["step"] > 0]
  reached = [r[metric] >= first[metric] if metric.endswith("acc") else r[metric] <= first[metric] for r in evals]
  assert result["stop_reason"] == "target" and reached[-1] and not any(reached[:-1])
  assert result["step"] == evals[-1]["step"] < 200


def test_stop_target_on_a_metric_no_evaluation_makes_is_one_sentence(data, tmp_path):
  c = tiny_config(data["a"], steps=20)
  c.stop.update(target_metric="acc_nothing", target=0.9)
  with pytest.raises(config_lib.ConfigError, match=r"stop.target_metric='acc_nothing' is not an evaluated metric: "
                                                   r"use one of .*valid_ntp"):
    train.run(c, str(tmp_path / "bad"))
  c.stop.target = 0.0
  with pytest.raises(config_lib.ConfigError, match="go together"):
    config_lib.validate(c)
  assert config_lib.target_mode(tiny_config(data["a"])) == "min"


@pytest.mark.parametrize("kind", ["paper", "masked_swiglu"])
def test_microbatched_step_equals_one_big_step(kind):
  """Gradient accumulation over 2 chunks equals one step over the whole batch: the paper model on plain rows,
  and a Llama-style block on chat rows with a loss mask (chunks with different target counts) and segments."""
  import jax
  import ml_collections
  from jaxreplay.models import decoder
  from jaxreplay.train import optim, steps
  if kind == "paper":
    cfg = decoder.ModelConfig(vocab_size=64, d_model=16, n_layers=1, head_dim=8, seq_len=16)
  else:
    cfg = decoder.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=32,
                              seq_len=16, mlp="swiglu", norm_scale=True, qk_norm=False)
  init = jax.jit(decoder.init_params, static_argnums=0)  # eager flax init compiles op by op: slow
  params, frozen = init(cfg, jax.random.key(0)), init(cfg, jax.random.key(1))  # frozen differs: KL has a gradient
  c = config_lib.default()
  c.optim.update(lr=1e-2, warmup_tokens=0, batch_size=4)
  c.model.seq_len = 16
  opt, sched = optim.make_optimizer(c, 10), optim.lr_schedule(c, 10)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (4, 16)).astype(np.int32)
  batch = tokens
  if kind != "paper":
    mask = np.zeros((4, 16), bool)
    mask[0, 3:] = mask[1, 10:] = mask[2, 2:5] = mask[3, 1:] = True
    segments = np.ones((4, 16), np.int32)
    segments[0, 8:] = 2
    batch = dict(tokens=tokens, mask=mask, segments=segments)
  replay = rng.integers(0, 64, (2, 16)).astype(np.int32)
  state = dict(params=params, opt_state=opt.init(params), step=np.int32(0))
  objective = steps.make_objective(cfg, ml_collections.ConfigDict(dict(method="kl", coeff=3.0)))
  one, aux1 = jax.jit(steps.make_train_step(objective, opt, sched, 1))(state, frozen, batch, replay)
  two, aux2 = jax.jit(steps.make_train_step(objective, opt, sched, 2))(state, frozen, batch, replay)
  for k in ("train_ntp", "train_reg", "train_loss"):
    np.testing.assert_allclose(aux2[k], aux1[k], rtol=1e-5)
  # Adam's first step divides by |g|: float rounding in tiny gradients shows at ~1e-5 of lr 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5), two["params"], one["params"])
  if kind != "paper":  # the masked loss is the mean over the mask's targets, by an independent computation
    logits = np.asarray(decoder.logits(cfg, params, tokens, batch["segments"],
                                       decoder.segment_positions(batch["segments"])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:]
    np.testing.assert_allclose(float(aux1["train_ntp"]), (nll * w).sum() / w.sum(), rtol=1e-5)
