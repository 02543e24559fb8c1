"""Evaluation metrics against an independent float64 numpy computation, and the forgetting metrics of a run
against values worked out by hand from a made-up pretraining curve."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay import config as config_lib, sharding
from jaxreplay.evals import forgetting
from jaxreplay.models import decoder
from jaxreplay.train import evaluation, steps

CFG = decoder.ModelConfig(d_model=32, n_layers=2, head_dim=16, seq_len=12, vocab_size=40)
MESH = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))


def np_metrics(logits, frozen_logits, tokens, mask):
  """Per-row sums over the positions with a target, in float64, from the definitions: nll of the next token,
  argmax hits, KL(π_pre ‖ π_θ) summed over the vocabulary; weights from the mask on targets."""
  z = np.asarray(logits, np.float64)[:, :-1]
  zf = np.asarray(frozen_logits, np.float64)[:, :-1]
  tgt = np.asarray(tokens)[:, 1:]
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  logq = zf - np.log(np.exp(zf - zf.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zf.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  hit = (z.argmax(-1) == tgt).astype(np.float64)
  kl = (np.exp(logq) * (logq - logp)).sum(-1)
  w = np.ones_like(nll) if mask is None else np.asarray(mask, np.float64)[:, 1:]
  w2 = w.copy()
  w2[:, :w.shape[1] // 2] = 0.0  # the second half of the T-1 predicting positions
  return dict(nll=(nll * w).sum(), nll_h2=(nll * w2).sum(), correct=(hit * w).sum(), kl=(kl * w).sum(),
              count=w.sum(), count_h2=w2.sum())


def test_evaluate_sets_matches_a_float64_numpy_reference():
  params = decoder.init_params(CFG, jax.random.key(0))
  frozen = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
  rng = np.random.default_rng(0)
  toks = lambda b: rng.integers(0, CFG.vocab_size, (b, CFG.seq_len)).astype(np.int32)
  mask = np.zeros((3, CFG.seq_len), np.int32)  # uneven counts per row, one row with none in the first half
  mask[0, 2:9] = 1
  mask[1, 1:] = 1
  mask[2, 8:11] = 1
  sets = {"valid": [toks(2), toks(3)],  # two batches of different sizes
          "chat": [{"tokens": toks(3), "mask": mask}]}
  eval_fn = jax.jit(steps.make_eval_step(CFG, True))
  got = evaluation.evaluate_sets(sets, eval_fn, params, frozen, MESH)

  for name, batches in sets.items():
    tot = {}
    for b in batches:
      t, m = (b["tokens"], b["mask"]) if isinstance(b, dict) else (b, None)
      sums = np_metrics(decoder.logits(CFG, params, jnp.asarray(t)), decoder.logits(CFG, frozen, jnp.asarray(t)),
                        t, m)
      tot = {k: tot.get(k, 0.0) + v for k, v in sums.items()}
    assert tot["count"] == {"valid": 5 * (CFG.seq_len - 1), "chat": 7 + 11 + 3}[name]
    want = {f"{name}_ntp": tot["nll"] / tot["count"], f"{name}_ntp_h2": tot["nll_h2"] / tot["count_h2"],
            f"{name}_acc": tot["correct"] / tot["count"], f"{name}_kl": tot["kl"] / tot["count"]}
    assert set(k for k in got if k.startswith(name + "_")) == set(want)
    for k, v in want.items():
      assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
  assert 0.2 < got["valid_kl"] < 10 and got["chat_kl"] > 0.2  # the frozen model differs: a KL that matters


def test_evaluate_sets_without_kl_and_a_mask_that_weights_rows():
  """A row whose mask is all zero adds nothing; without a frozen model there is no KL."""
  params = decoder.init_params(CFG, jax.random.key(2))
  rng = np.random.default_rng(1)
  t = rng.integers(0, CFG.vocab_size, (2, CFG.seq_len)).astype(np.int32)
  mask = np.zeros_like(t)
  mask[0, 5:] = 1
  got = evaluation.evaluate_sets({"x": [{"tokens": t, "mask": mask}]}, jax.jit(steps.make_eval_step(CFG, False)),
                                 params, params, MESH)
  ref = np_metrics(decoder.logits(CFG, params, jnp.asarray(t[:1])), decoder.logits(CFG, params, jnp.asarray(t[:1])),
                   t[:1], mask[:1])
  assert "x_kl" not in got
  assert got["x_ntp"] == pytest.approx(ref["nll"] / 7, rel=1e-5)
  assert got["x_acc"] == pytest.approx(ref["correct"] / 7, rel=1e-5)
  assert got["x_ntp_h2"] == pytest.approx(ref["nll_h2"] / ref["count_h2"], rel=1e-5)


def _pretraining_run(path, seed=3):
  """A made-up pretraining run directory: config, its metrics (a curve, a non-eval row, the final row), final.json."""
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=12, vocab_size=40)
  c.seed = seed
  path.mkdir()
  (path / "config.json").write_text(c.to_json())
  rows = [dict(step=1, tokens=100, valid_ntp=5.0), dict(step=1, tokens=100, train_ntp=9.0),
          dict(step=2, tokens=200, valid_ntp=4.0), dict(step=3, tokens=300, valid_ntp=3.0),
          dict(step=4, tokens=400, valid_ntp=2.5), dict(step=4, tokens=400, valid_ntp=0.1, final=True)]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "final.json").write_text(json.dumps(dict(valid_ntp=2.5, tokens=400)))
  return c


@pytest.mark.parametrize("prev_ntp, delta, multiplier", [
    (3.5, 1.0, 250 / 400),   # forgot: loss up by 1, as good as the curve at 250 of 400 tokens
    (2.5, 0.0, 1.0),         # forgot nothing
    (2.0, -0.5, 1.0),        # better than pretraining ended: a negative delta, nothing forgotten
    (6.0, 3.5, 100 / 400),   # worse than the first evaluation
])
def test_forgetting_metrics_of_a_run_by_hand(tmp_path, prev_ntp, delta, multiplier):
  c_pre = _pretraining_run(tmp_path / "pre")
  model_cfg = decoder.ModelConfig.from_config(c_pre.model)
  init = decoder.init_params(model_cfg, jax.random.key(c_pre.seed))
  frozen = jax.tree.map(lambda x: x + 0.5, init)        # ‖π_pre − init‖ = 0.5·√N
  params = jax.tree.map(lambda x: x - 0.1, frozen)      # ‖θ − π_pre‖ = 0.1·√N
  c = config_lib.default()
  c.init["from"] = str(tmp_path / "pre")
  out = forgetting.forgetting_metrics(c, params, frozen, dict(prev_ntp=prev_ntp))
  assert out["prev_ntp_before"] == 2.5
  assert out["prev_ntp_delta"] == pytest.approx(delta)
  assert math.copysign(1, out["prev_ntp_delta"]) == math.copysign(1, prev_ntp - 2.5) or delta == 0
  assert out["compute_multiplier"] == pytest.approx(multiplier)
  assert out["drift_ratio"] == pytest.approx(0.2, rel=1e-4)  # the init of the run's own seed, not another


def test_drift_ratio_uses_the_pretraining_runs_seed(tmp_path):
  c_pre = _pretraining_run(tmp_path / "pre", seed=3)
  model_cfg = decoder.ModelConfig.from_config(c_pre.model)
  other = decoder.init_params(model_cfg, jax.random.key(4))
  frozen = jax.tree.map(lambda x: x + 0.5, other)
  c = config_lib.default()
  c.init["from"] = str(tmp_path / "pre")
  out = forgetting.forgetting_metrics(c, jax.tree.map(lambda x: x - 0.1, frozen), frozen, {})
  assert "prev_ntp_delta" not in out
  assert out["drift_ratio"] != pytest.approx(0.2, rel=0.05)  # measured from seed 3's init, not seed 4's
