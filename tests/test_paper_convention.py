"""The paper's loss convention (divide by T, last position zeroed) against jaxreplay's (divide by T−1), on rows
computed by hand; and the sweep files' targets converted with it."""
import math
import os
import sys

import numpy as np
import pytest

from jaxreplay.models import losses
from jaxreplay.experiments import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "sweeps"))
import _paper  # noqa: E402  (sweeps/_paper.py, as sweep files import it)


def test_uniform_row_by_hand():
  # V=4, all logits equal: every position's loss is ln 4. T=4: three positions have a target.
  T, V = 4, 4
  logits, tokens = np.zeros((1, T, V), np.float32), np.array([[1, 2, 3, 0]])
  ours = float(losses.next_token_loss(logits, tokens))
  paper = (3 * math.log(4) + 0.0) / 4  # the paper's code: the last position's 0 counted, divided by T
  assert ours == pytest.approx(math.log(4), rel=1e-6)
  assert _paper.paper_loss_to_ours(paper, T) == pytest.approx(ours, rel=1e-6)


def test_random_row_and_second_half_against_a_numpy_reference():
  rng = np.random.default_rng(0)
  T, V = 8, 11
  logits = rng.normal(size=(1, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(1, T))
  logp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
  nll = np.array([-logp[t, tokens[0, t + 1]] for t in range(T - 1)] + [0.0])  # the paper's row, last zeroed
  paper, paper_h2 = nll.mean(), nll[T // 2:].mean()
  ours = float(losses.next_token_loss(logits, tokens))
  assert _paper.paper_loss_to_ours(paper, T) == pytest.approx(ours, rel=1e-5)
  # the second half on the positions that have a target, T/2 … T−2
  assert _paper.paper_h2_to_ours(paper_h2, T) == pytest.approx(nll[T // 2:T - 1].mean(), rel=1e-6)
  # jaxreplay's own second half (losses.second_half_mean over the T−1 targets) starts one position earlier
  ours_h2 = float(losses.second_half_mean(losses.token_nll(logits, tokens)))
  assert ours_h2 == pytest.approx(nll[T // 2 - 1:T - 1].mean(), rel=1e-5)


def test_sweep_targets_are_the_papers_numbers_converted():
  T = 256
  factor = T / (T - 1)
  expected = {"grid_2d.py": {"finetune": 2.2}, "model_size.py": {"pretrain": 3.0, "finetune": 2.76},
              "learning_rate.py": {"pretrain": 3.2, "finetune": 3.2}, "high_lr.py": {"finetune": 3.3},
              "pretrain_length.py": {"finetune": 2.9}}
  for file, stages in expected.items():
    runs = sweeps.expand(sweeps.load(os.path.join(ROOT, "sweeps", file)))
    for stage, paper in stages.items():
      targets = {r.config["stop"]["target_loss"] for r in runs if r.stage == stage}
      assert len(targets) == 1 and targets.pop() == pytest.approx(paper * factor, abs=1e-6), (file, stage)
  assert 2.2 * factor - 2.2 == pytest.approx(0.0086, abs=1e-4)  # 0.39%
