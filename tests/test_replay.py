"""The replay objective (KL, replace) and self-generated replay (buffering, determinism, the disk cache)."""
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib
from jaxreplay.replay import sources as replay
from jaxreplay.replay import self_generated as replay_self
from jaxreplay import sharding
from jaxreplay.train import steps
from jaxreplay.models import decoder as M
from jaxreplay.models import losses
from jaxreplay.models import sampler as sampler_lib

TINY = M.ModelConfig(d_model=32, n_layers=2, head_dim=8, seq_len=12, vocab_size=50)


def np_params(cfg, seed, scale=1.0):
  shapes = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((scale * rng.normal(size=s.shape) / math.sqrt(s.shape[-2] if s.ndim > 1
                                                                                          else 1)).astype(np.float32)),
                      shapes)


@pytest.fixture(scope="module")
def frozen():
  return np_params(TINY, 0, scale=2.0)


# --- The KL regularizer -----------------------------------------------------------------------------------------

def test_kl_is_zero_at_the_teacher_and_its_gradient_is_exact():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(2, 5, 7)).astype(np.float32)
  student = (teacher + 0.5 * rng.normal(size=teacher.shape)).astype(np.float32)
  kl = jax.jit(losses.kl_loss)
  assert abs(float(kl(teacher, teacher))) < 1e-7
  g_student, g_teacher = jax.jit(jax.grad(lambda t, s: losses.kl_loss(t, s), argnums=(1, 0)))(teacher, student)
  np.testing.assert_allclose(jax.grad(losses.kl_loss, argnums=1)(teacher, teacher), 0.0, atol=1e-7)
  assert not np.any(g_teacher)  # the frozen model's predictions are a target, never differentiated
  # Closed form in float64: d/d student logits = (softmax(student) − softmax(teacher)) / #positions, last row 0.
  def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
  want = (softmax(student.astype(np.float64)) - softmax(teacher.astype(np.float64))) / (2 * 4)
  want[:, -1] = 0.0
  np.testing.assert_allclose(g_student, want, atol=2e-7)
  # Central finite differences along random directions.
  for i in range(3):
    v = rng.normal(size=teacher.shape).astype(np.float32)
    h = 1e-2
    fd = (float(kl(teacher, student + h * v)) - float(kl(teacher, student - h * v))) / (2 * h)
    assert fd == pytest.approx(float(np.sum(g_student * v)), rel=1e-2, abs=1e-5)


def test_kl_objective_at_the_pretrained_weights(frozen):
  """At θ = π_pre the KL term is 0 and adds no gradient; away from it, its gradient matches finite differences."""
  rc = types.SimpleNamespace(method="kl", coeff=3.0)
  batch = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50), np.int32)
  replay_rows = np.asarray(jax.random.randint(jax.random.key(2), (4, 12), 0, 50), np.int32)
  kl_obj = steps.make_objective(TINY, rc, None)
  plain = steps.make_objective(TINY, None, None)

  @jax.jit
  def both(theta):
    (_, aux), g = jax.value_and_grad(kl_obj, has_aux=True)(theta, frozen, batch, replay_rows)
    g_plain = jax.grad(lambda p: plain(p, frozen, batch, None)[0])(theta)
    return aux["train_reg"], g, g_plain

  reg, g, g_plain = both(frozen)
  assert abs(float(reg)) < 1e-6
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=2e-5)

  # Away from π_pre: d/dt reg(θ + t·v) by finite differences vs the gradient of the objective minus NTP's.
  rng = np.random.default_rng(3)
  v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.05), frozen)
  theta = jax.tree.map(lambda p, d: p + 4 * d, frozen, v)
  reg0, g, g_plain = both(theta)
  assert float(reg0) > 1e-3
  analytic = sum(float(jnp.vdot((a - b) / rc.coeff, d)) for a, b, d in
                 zip(jax.tree.leaves(g), jax.tree.leaves(g_plain), jax.tree.leaves(v)))
  h = 0.05
  up = float(both(jax.tree.map(lambda p, d: p + h * d, theta, v))[0])
  down = float(both(jax.tree.map(lambda p, d: p - h * d, theta, v))[0])
  assert (up - down) / (2 * h) == pytest.approx(analytic, rel=2e-2)


def test_kl_objective_with_teacher_logits_from_sampling_equals_the_frozen_forward(frozen):
  """Teacher logits kept from sampling give the KL loss and gradient of the frozen forward pass, which then
  does not run (NaN frozen weights leave the result untouched)."""
  rc = types.SimpleNamespace(method="kl", coeff=2.0)
  batch = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50), np.int32)
  sampler = sampler_lib.make_sampler(TINY, sampler_lib.SamplingConfig(), 4, 1, 12, return_logits=True)
  rows, teacher = sampler(frozen, np.full((4, 1), 3, np.int32), jax.random.key(5))
  theta = jax.tree.map(lambda p: p * 1.1, frozen)  # away from π_pre: the KL term and its gradient are not 0
  grad = jax.jit(jax.value_and_grad(steps.make_objective(TINY, rc, None), has_aux=True))
  (loss, aux), g = grad(theta, frozen, batch, rows, None)
  nan_frozen = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), frozen)
  (loss_s, aux_s), g_s = grad(theta, nan_frozen, batch, rows, teacher)
  assert float(aux["train_reg"]) > 1e-3
  assert float(aux_s["train_reg"]) == pytest.approx(float(aux["train_reg"]), rel=1e-5)
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fraction,B", [(0.25, 8), (0.3, 8), (0.9, 8), (0.29, 100), (0.7, 10), (0.05, 8)])
def test_replace_keeps_the_batch_size_and_replaces_floor_fraction_rows(fraction, B):
  batch = np.arange(B * 4, dtype=np.int32).reshape(B, 4)
  rows = -np.arange(B * 4, dtype=np.int32).reshape(B, 4) - 1
  out = np.asarray(losses.replace_rows(jnp.asarray(batch), jnp.asarray(rows), fraction))
  n = math.floor(round(fraction * B, 9))
  assert out.shape == batch.shape
  np.testing.assert_array_equal(out[:n], rows[:n])
  np.testing.assert_array_equal(out[n:], batch[n:])


def test_replace_objective_trains_on_the_mixed_batch(frozen):
  rc = types.SimpleNamespace(method="replace", coeff=0.5)
  batch = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50), np.int32)
  rows = np.asarray(jax.random.randint(jax.random.key(2), (4, 12), 0, 50), np.int32)
  loss, aux = jax.jit(steps.make_objective(TINY, rc, None))(frozen, frozen, batch, rows)
  mixed = np.concatenate([rows[:2], batch[2:]])
  want = jax.jit(lambda p, t: losses.next_token_loss(M.logits(TINY, p, t), t))(frozen, mixed)
  assert float(aux["train_ntp"]) == pytest.approx(float(want), rel=1e-5)
  assert "train_reg" not in aux


# --- Self-generated replay ------------------------------------------------------------------------------------

def make_config(tmp_path, **replay_kw):
  c = config_lib.default()
  c.model.update(d_model=32, n_layers=2, head_dim=8, seq_len=12, vocab_size=50)
  c.optim.batch_size = 4
  c.init["from"] = str(tmp_path / "pretrain")
  c.replay.update(method="kl", source="self", batch_size=0, buffer=2, **replay_kw)
  return c


def fake_pretrain(tmp_path):
  export = tmp_path / "pretrain" / "export"
  export.mkdir(parents=True, exist_ok=True)
  (export / "config.json").write_text(json.dumps(dict(data=dict(dataset_id=0))))
  (export / "info.json").write_text(json.dumps(dict(step=100, dataset_id=0)))


def make_self(c, frozen, pretraining_dataset_id=0):
  """The source as the trainer makes it: what it reads passed as arguments."""
  mesh = sharding.make_mesh(config_lib.default().mesh)
  prompt_id = replay_self.paper_prompt_id(c, pretraining_dataset_id)
  return replay_self.SelfGeneratedReplay(c, mesh, TINY, frozen, prompt_id, c.init["from"])


@pytest.mark.parametrize("teacher", ["forward", "auto"])
def test_rows_come_from_the_frozen_model_once_each_and_deterministically(tmp_path, frozen, teacher):
  c = make_config(tmp_path, teacher=teacher)
  source = replay.make_source(c, sharding.make_mesh(c.mesh), TINY, frozen, prompt_id=3,
                              weights_dir=c.init["from"])
  assert isinstance(source, replay_self.SelfGeneratedReplay)
  assert source.sampled_teacher == (teacher == "auto")  # auto: 2·4·12·50 fp32 logits are far below 1 GiB
  out = [source.next(s) for s in range(5)]  # refills 0, 1 and half of 2
  batches = [np.asarray(b) for b, _ in out]
  assert source.sampled_refills == 3
  for b in batches:
    assert b.shape == (4, 12) and b.dtype == np.int32
    assert np.all(b[:, 0] == 3)  # prompted by the pretraining data's id token alone
  rows = {tuple(r) for b in batches for r in b}
  assert len(rows) == 20  # every row is used once
  # Refill 1 is exactly the frozen model's samples under the key derived from (seed, 1).
  sampler = sampler_lib.make_sampler(TINY, sampler_lib.SamplingConfig(), 8, 1, 12)
  want = np.asarray(sampler(frozen, np.full((8, 1), 3, np.int32), replay_self.refill_key(c.seed, 1)))
  np.testing.assert_array_equal(np.concatenate(batches[2:4]), want)
  assert source.next(2)[0].sharding.is_equivalent_to(sharding.batch_sharding(source.mesh), 2)
  if teacher == "forward":
    assert all(t is None for _, t in out)
  else:  # the frozen model's logits from sampling: what its forward pass gives on the rows
    for b, t in out:
      assert t.shape == (4, 12, 50) and t.dtype == np.float32
      assert t.sharding.is_equivalent_to(sharding.batch_sharding(source.mesh, 3), 3)
      np.testing.assert_allclose(np.asarray(t)[:, :-1], M.logits(TINY, frozen, b)[:, :-1], rtol=1e-4, atol=1e-4)
  # A resumed run (a fresh source that starts at step 3) regenerates the same rows and teacher logits.
  resumed = make_self(c, frozen, 3)
  for s in (3, 4):
    rows, t = resumed.next(s)
    np.testing.assert_array_equal(np.asarray(rows), batches[s])
    if t is not None:
      np.testing.assert_array_equal(np.asarray(t), np.asarray(out[s][1]))


def test_dataset_id_outside_the_reserved_ids_is_refused(tmp_path, frozen):
  c = make_config(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="reserved ids 0–9"):
    make_self(c, frozen, 12)
  with pytest.raises(config_lib.ConfigError, match="init.from"):
    make_self(c, None)


def test_disk_cache_is_shared_and_never_reused_for_other_settings(tmp_path, frozen, monkeypatch):
  fake_pretrain(tmp_path)
  cache_root = tmp_path / "cache"
  c = make_config(tmp_path, cache_dir=str(cache_root))
  first = make_self(c, frozen)
  assert first.sampled_teacher  # the cache holds tokens only, whatever the teacher
  a, a_teacher = zip(*[first.next(s) for s in range(3)])
  assert first.sampled_refills == 2
  (cache_dir,) = [p for p in cache_root.iterdir()]
  assert sorted(p.name for p in cache_dir.iterdir() if p.suffix != ".lock") == [
      "fingerprint.json", "refill_000000.npy", "refill_000001.npy"]  # no temporary files left behind
  fingerprint = json.loads((cache_dir / "fingerprint.json").read_text())
  assert fingerprint["sampling"]["temperature"] == 1.0 and fingerprint["rows"] == 4

  # A second run with the same settings (another sweep point) reads the samples: no sampling at all. Their
  # teacher logits come from a forward pass of the frozen model at refill time, equal up to rounding.
  second = make_self(c, frozen)
  monkeypatch.setattr(second, "sampler", None)
  for s in range(3):
    rows, t = second.next(s)
    np.testing.assert_array_equal(np.asarray(rows), a[s])
    assert t.sharding.is_equivalent_to(sharding.batch_sharding(second.mesh, 3), 3)
    np.testing.assert_allclose(np.asarray(t)[:, :-1], np.asarray(a_teacher[s])[:, :-1], rtol=1e-4, atol=1e-4)
  assert second.sampled_refills == 0
  monkeypatch.undo()

  # Other sampling settings or other weights: another directory, never the first one's samples.
  hot = make_config(tmp_path, cache_dir=str(cache_root), temperature=0.5)
  other = make_self(hot, frozen)
  assert other.cache.directory != first.cache.directory
  changed = jax.tree.map(lambda x: x, frozen)
  changed["unembed"] = changed["unembed"].at[0, 0].add(1e-3)
  assert make_self(c, changed).cache.directory != first.cache.directory

  # Pointing cache_dir at the first cache with other settings is an error naming what differs.
  wrong = make_config(tmp_path, cache_dir=first.cache.directory, temperature=0.5)
  with pytest.raises(config_lib.ConfigError, match="sampling.temperature"):
    make_self(wrong, frozen)
  # So is a re-exported checkpoint (its info.json changed) or a tampered fingerprint.
  (tmp_path / "pretrain" / "export" / "info.json").write_text(json.dumps(dict(step=200, dataset_id=0)))
  with pytest.raises(config_lib.ConfigError, match="checkpoint"):
    make_self(make_config(tmp_path, cache_dir=first.cache.directory), frozen)
  # A damaged refill file is reported, not used.
  fake_pretrain(tmp_path)
  np.save(cache_dir / "refill_000000.npy", np.zeros((3, 3), np.int32))
  broken = make_self(c, frozen)
  with pytest.raises(config_lib.ConfigError, match="refill_000000"):
    broken.next(0)
