"""The forgetting metrics against values worked out by hand."""
import math

import numpy as np
import pytest

from jaxreplay.evals import forgetting as evaluate

TOKENS = np.array([100.0, 200.0, 300.0, 400.0])


@pytest.mark.parametrize("loss, curve, want", [
    (3.5, [5.0, 4.0, 3.0, 2.5], 250 / 400),   # halfway between the 200- and 300-token points
    (3.0, [5.0, 4.0, 3.0, 2.5], 300 / 400),   # exactly on a point
    (3.75, [5.0, 4.0, 3.0, 2.5], 225 / 400),  # a quarter of the way from 4.0 down to 3.0
    (6.0, [5.0, 4.0, 3.0, 2.5], 100 / 400),   # worse than the first eval: its tokens
    (2.0, [5.0, 4.0, 3.0, 2.5], 1.0),         # better than the whole curve: nothing forgotten
    (3.5, [5.0, 3.0, 4.0, 2.0], 175 / 400),   # the first crossing counts: 100 + 0.75 · 100
    (2.5, [5.0, 4.0, 3.0, 2.5], 1.0),         # the final loss itself: all of pretraining
])
def test_compute_multiplier_by_hand(loss, curve, want):
  assert evaluate.compute_multiplier(TOKENS, np.array(curve), loss) == pytest.approx(want)


def test_compute_multiplier_of_an_empty_curve_is_nan():
  assert math.isnan(evaluate.compute_multiplier(np.array([]), np.array([]), 3.0))


def test_drift_ratio_by_hand():
  init = {"a": np.array([1.0, 0.0]), "b": np.array([[0.0, 0.0]])}
  frozen = {"a": np.array([1.0, 2.0]), "b": np.array([[0.0, 0.0]])}  # ‖π_pre − init‖ = 2
  params = {"a": np.array([4.0, 6.0]), "b": np.array([[0.0, 0.0]])}  # ‖θ − π_pre‖ = √(9 + 16) = 5
  assert evaluate.drift_ratio(params, frozen, init) == pytest.approx(2.5)
  params["b"] = np.array([[1.0, -1.0]])  # √(25 + 2) / 2: every leaf counts
  assert evaluate.drift_ratio(params, frozen, init) == pytest.approx(math.sqrt(27) / 2)
  assert evaluate.drift_ratio(frozen, frozen, init) == 0.0
