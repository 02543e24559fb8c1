"""A pack member equals the same run trained alone (train/pack.py against train/loop.py)."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxreplay import platform as platform_lib
from jaxreplay.io import read_metrics
from jaxreplay.models import export as export_lib
from jaxreplay.train import loop, optim, pack, pack_step

from helpers import tiny_config, two_datasets

# On a CPU the packed step loops over its members (platform.Choices.loop_pack_members), so each member's arithmetic is the lone
# run's and members equal lone runs bitwise. Where it vmaps them (accelerators) it is not bitwise: vmap turns each
# member's matrix products into one batched product whose sums may be ordered differently (pretraining: ≤ 5e-7 on
# weights of scale 0.2 after 30 steps, measured on a CPU when it vmapped). Members with different replay.coeff are
# not bitwise either way: they get it traced, while a lone run's is a constant that XLA folds into the
# loss's scale factors: the lone objective's own gradient with coeff=3.0 as a constant and as an argument already
# differs by up to 5e-3 relative on small elements (coeff 1.0: bitwise), which Adam at lr 1e-2 amplifies to
# ~3e-4 in the loss and ~1e-3 of a weight matrix's norm after 8 steps (single weights with near-zero gradients
# more: Adam's step there follows the gradient's sign). Members that share a coefficient use the constant.
# Schedules, Adam's constants, data order and masking are the lone run's arithmetic (lr compared bitwise).
BITWISE = platform_lib.choices(jax.default_backend()).loop_pack_members
VMAP_RTOL, VMAP_ATOL = 2e-5, 2e-6
RTOL, ATOL = (0.0, 0.0) if BITWISE else (VMAP_RTOL, VMAP_ATOL)
COEFF_RTOL, COEFF_ATOL, COEFF_NORM_RTOL = 1e-3, 2e-5, 5e-3  # norm: 2.7e-3 measured on the worst tensor (coeff 3.0)
# KL to the frozen model grows as the square of the finetune's small displacement from it, whose relative rounding
# is larger than the weights' own: 1e-3 on the weights shows as up to ~1.4e-3 on prev_kl (coeff 3.0, measured).
COEFF_KL_RTOL = 3e-3
METRICS = ("valid_ntp", "valid_ntp_h2", "prev_ntp", "prev_kl", "valid_kl", "step", "tokens")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return two_datasets(root)


@pytest.fixture(scope="module")
def parents(data, tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  out = []
  for seed in (0, 1):
    c = tiny_config(data["a"], steps=30)
    c.seed = seed
    out.append(str(root / f"pre{seed}"))
    loop.run(c, out[-1])
  return out


def finetune(data, parent, steps=8, **replay):
  c = tiny_config(data["b"], steps=steps)
  c.init["from"] = parent
  c.replay.update(**replay)
  c.optim.warmup_tokens = 0
  return c


def assert_member_equals_lone(configs, tmp_path, rtol=RTOL, atol=ATOL, norm_rtol=None, kl_rtol=None):
  lone = [loop.run(c, str(tmp_path / f"lone{k}")) for k, c in enumerate(configs)]
  dirs = [str(tmp_path / f"member{k}") for k in range(len(configs))]
  packed = pack.run_pack(configs, dirs, str(tmp_path / "pack"))
  for k, (a, b) in enumerate(zip(lone, packed)):
    assert isinstance(b, dict), b
    assert a["stop_reason"] == b["stop_reason"]
    for key in METRICS:
      if key in a:
        tol = kl_rtol if kl_rtol and key.endswith("_kl") else rtol
        np.testing.assert_allclose(b[key], a[key], rtol=tol, atol=atol, err_msg=f"member {k}: {key}")
    pa = export_lib.load_exported(str(tmp_path / f"lone{k}"))
    pb = export_lib.load_exported(dirs[k])
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
      x, y = np.asarray(x), np.asarray(y)
      if norm_rtol is None:
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)
      else:  # single weights with near-zero gradients may flip Adam's sign-like step: compare whole tensors
        assert np.linalg.norm(y - x) <= norm_rtol * np.linalg.norm(x)
    rows_a = [r for r in read_metrics(str(tmp_path / f"lone{k}")) if "train_loss" in r]
    rows_b = [r for r in read_metrics(dirs[k]) if "train_loss" in r]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    np.testing.assert_allclose([r["lr"] for r in rows_b], [r["lr"] for r in rows_a], rtol=0, atol=0)
    np.testing.assert_allclose([r["train_loss"] for r in rows_b], [r["train_loss"] for r in rows_a], rtol=rtol)
    evals_a = [(r["step"], r["valid_ntp"]) for r in read_metrics(str(tmp_path / f"lone{k}")) if "valid_ntp" in r]
    evals_b = [(r["step"], r["valid_ntp"]) for r in read_metrics(dirs[k]) if "valid_ntp" in r]
    assert [e[0] for e in evals_a] == [e[0] for e in evals_b]  # the step-0 one included (shared by equal members)
    np.testing.assert_allclose([e[1] for e in evals_b], [e[1] for e in evals_a], rtol=rtol, atol=atol)
    assert os.path.exists(os.path.join(dirs[k], "final.json"))
  return lone, packed


def test_pretraining_members_with_own_seed_lr_schedule_betas_and_length_equal_lone_runs(data, tmp_path):
  configs = []
  for seed, lr, steps, sched, wd in [(0, 1e-2, 30, "constant", 0.02), (1, 3e-3, 20, "cosine", 0.0),
                                     (2, 1e-2, 25, "wsd", 0.1)]:
    c = tiny_config(data["a"], steps=steps)
    c.seed, c.optim.lr, c.optim.schedule, c.optim.weight_decay = seed, lr, sched, wd
    c.optim.b2 = 0.99 if seed == 1 else 0.95
    configs.append(c)
  lone, packed = assert_member_equals_lone(configs, tmp_path)
  assert [p["step"] for p in packed] == [30, 20, 25]


def test_the_accelerators_vmapped_pack_equals_lone_runs_within_rounding(data, tmp_path, monkeypatch):
  """The accelerator choice (members vmapped, not looped) run on this CPU: members equal lone runs within the
  rounding of a batched matrix product, and, looped members being the lone runs bitwise, the CPU choice too."""
  cpu = platform_lib.choices
  monkeypatch.setattr(platform_lib, "choices", lambda p: dataclasses.replace(cpu(p), loop_pack_members=False))
  built, make = [], pack_step.make_packed_step
  monkeypatch.setattr(pack_step, "make_packed_step", lambda *a, **kw: built.append(kw["loop_members"]) or make(*a, **kw))
  configs = []
  for seed, lr in ((0, 1e-2), (1, 3e-3)):
    c = tiny_config(data["a"], steps=12)
    c.seed, c.optim.lr = seed, lr
    configs.append(c)
  assert_member_equals_lone(configs, tmp_path, rtol=VMAP_RTOL, atol=VMAP_ATOL)
  assert built == [False]  # the vmapped program is the one that trained


def test_members_of_one_shape_share_one_compiled_init_and_eval(data, tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "SHARED_PROGRAMS", {})
  configs = [tiny_config(data["a"], steps=4) for _ in range(3)]
  for k, c in enumerate(configs):
    c.seed, c.optim.lr = k, 1e-3 * (k + 1)
  pack.run_pack(configs, [str(tmp_path / f"m{k}") for k in range(3)], str(tmp_path / "pack"))
  assert sorted(key[0] for key in loop.SHARED_PROGRAMS) == ["eval", "init"]
  assert [p._cache_size() for p in loop.SHARED_PROGRAMS.values()] == [1, 1]  # compiled once for the three members


def test_members_starting_equal_are_evaluated_at_step_0_once(data, tmp_path, monkeypatch):
  calls = []
  evaluate = loop.Trainer.evaluate
  monkeypatch.setattr(loop.Trainer, "evaluate", lambda t: calls.append(t.step) or evaluate(t))
  configs = [tiny_config(data["a"], steps=4) for _ in range(4)]
  for k, c in enumerate(configs):
    c.seed, c.optim.lr = k % 2, 1e-3 * (k + 1)  # two seeds: two initial parameter sets
  assert_member_equals_lone(configs, tmp_path)
  # lone: 4 runs × (step 0, step 4); the pack: 2 at step 0, then its 4 members' own at step 4
  assert sorted(calls) == [0] * 6 + [4] * 8


def test_accurate_adam_members_equal_lone_runs(data, tmp_path):
  configs = []
  for hl in (2e7, 5e7):  # 1−β₂ below what float32 resolves: optim's accurate Adam
    c = tiny_config(data["a"], steps=12)
    c.optim.b2_half_life_tokens = hl
    configs.append(c)
  assert optim.adam_kind(configs[0])[0] == "accurate"
  assert_member_equals_lone(configs, tmp_path)


@pytest.mark.parametrize("method,source", [("kl", "real"), ("ntp", "real"), ("kl", "self"),
                                           pytest.param("ntp", "self", marks=pytest.mark.slow)])
def test_finetuning_members_with_own_lr_and_seed_equal_lone_runs(data, parents, tmp_path, method, source):
  # No replay.cache_dir: a refill read from the cache gets its teacher logits from a forward pass, equal to the
  # sampled ones only up to rounding, which would hide what this test compares.
  extra = dict(buffer=4, batch_size=8) if source == "self" else {}
  configs = [finetune(data, parents[0], method=method, source=source, coeff=0.3, **extra) for _ in range(2)]
  configs[1].optim.lr = 3e-3
  configs[1].seed = 1  # its own data order and replay stream
  assert_member_equals_lone(configs, tmp_path)


def test_finetuning_members_with_own_coefficients_equal_lone_runs(data, parents, tmp_path):
  configs = [finetune(data, parents[0], method="kl", source="real", coeff=coeff) for coeff in (0.1, 1.0, 3.0)]
  _, packed = assert_member_equals_lone(configs, tmp_path, COEFF_RTOL, COEFF_ATOL, COEFF_NORM_RTOL,
                                        COEFF_KL_RTOL)
  assert {p["pack_replay_streams"] for p in packed} == {1}  # one stream, one teacher forward for all three


def test_members_sharing_parent_seed_and_sampling_share_one_self_generated_stream(data, parents, tmp_path):
  configs = [finetune(data, parents[0], steps=6, method="kl", source="self", coeff=0.5, buffer=4, batch_size=8,
                      cache_dir=str(tmp_path / "cache")) for _ in range(2)]
  configs[1].optim.lr = 3e-3
  out = pack.run_pack(configs, [str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "pack"))
  assert [o["pack_replay_streams"] for o in out] == [1, 1]
  # Sampled once for the pack: the cache holds one refill per 4 steps (6 steps: refills 0 and 1), not one per member.
  (cache,) = [d for d in os.listdir(tmp_path / "cache")]
  assert sorted(f for f in os.listdir(tmp_path / "cache" / cache) if f.endswith(".npy")) == [
      "refill_000000.npy", "refill_000001.npy"]


def test_members_from_different_parents_stack_their_frozen_models(data, parents, tmp_path):
  configs = [finetune(data, p, method="kl", source="real", coeff=1.0) for p in parents]
  configs[1].seed = 3  # its own data order and replay stream
  assert_member_equals_lone(configs, tmp_path)


def test_members_load_each_frozen_model_and_replay_stream_once(data, parents, tmp_path, monkeypatch):
  """Three members of two parents: two frozen models loaded, not three, and two replay streams made."""
  loads, streams = [], []
  load_frozen, make_source = loop.load_frozen, loop.replay_lib.make_source
  monkeypatch.setattr(loop, "load_frozen",
                      lambda stage, *a: loads.append(stage.c.init["from"]) or load_frozen(stage, *a))
  monkeypatch.setattr(loop.replay_lib, "make_source",
                      lambda c, *a, **kw: streams.append(c.init["from"]) or make_source(c, *a, **kw))
  configs = [finetune(data, p, steps=4, method="kl", source="real", coeff=1.0) for p in (parents * 2)[:3]]
  configs[2].optim.lr = 3e-3  # member 0's parent and seed: its frozen model and replay stream
  out = pack.run_pack(configs, [str(tmp_path / f"m{k}") for k in range(3)], str(tmp_path / "pack"))
  assert sorted(loads) == sorted(streams) == sorted(parents)
  assert [o["pack_replay_streams"] for o in out] == [2, 2, 2] and [o["step"] for o in out] == [4, 4, 4]


def test_member_stopping_at_a_target_loss_is_frozen_and_exported_at_its_stop(data, tmp_path):
  a = tiny_config(data["a"], steps=40)
  b = tiny_config(data["a"], steps=40)
  b.stop.target_loss = 3.0
  b.eval.every_tokens = 128 * 2
  a.eval.every_tokens = 128 * 2
  lone, packed = assert_member_equals_lone([a, b], tmp_path)
  assert packed[1]["stop_reason"] == "target_loss" and packed[1]["step"] < 40
  assert packed[0]["step"] == 40


def test_a_member_whose_loss_becomes_nan_fails_alone(data, tmp_path):
  good = tiny_config(data["a"], steps=10)
  bad = tiny_config(data["a"], steps=10)
  bad.optim.update(lr=1e30, warmup_tokens=0)
  out = pack.run_pack([good, bad], [str(tmp_path / "good"), str(tmp_path / "bad")], str(tmp_path / "pack"))
  assert isinstance(out[1], loop.TrainingError) and "lower optim.lr" in str(out[1])
  assert out[0]["step"] == 10 and loop.is_finished(str(tmp_path / "good"))
  assert not loop.is_finished(str(tmp_path / "bad"))


def test_a_finished_pack_returns_its_results_without_training(data, tmp_path):
  configs = [tiny_config(data["a"], steps=6) for _ in range(2)]
  dirs = [str(tmp_path / "m0"), str(tmp_path / "m1")]
  first = pack.run_pack(configs, dirs, str(tmp_path / "pack"))
  again = pack.run_pack(configs, dirs, str(tmp_path / "pack"))
  assert first == again
  with open(os.path.join(dirs[0], "final.json")) as f:
    assert json.load(f) == first[0]


def test_lr_table_is_the_schedule_evaluated_in_a_step(data):
  c = tiny_config(data["a"], steps=20)
  c.optim.schedule = "cosine"

  schedule = jax.jit(optim.lr_schedule(c, 20))
  table = pack_step.lr_table(c, 20, 24)
  np.testing.assert_array_equal(table[:20], [np.float32(schedule(s)) for s in range(20)])
  assert (table[20:] == table[19]).all()
