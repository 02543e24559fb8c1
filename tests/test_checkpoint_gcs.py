"""Checkpoints straight to a gs:// workdir (orbax → tensorstore → the loopback GCS server): save, restore,
keep policy, a damaged newest checkpoint set aside in the bucket, and a missing bucket as one sentence."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gcs_server import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from jaxreplay import io
from jaxreplay.errors import CheckpointError
from jaxreplay.train import checkpoint as ckpt_lib

CFG = ml_collections.ConfigDict(dict(every_steps=1, every_minutes=0.0, keep_last=2, keep_every_steps=0,
                                     async_save=True))


def _state(v):
  return dict(params=dict(w=jnp.full((8, 4), v, jnp.float32), b=jnp.arange(3.0) + v), step=jnp.int32(v))


def test_save_and_restore_on_a_bucket(gcs_bucket):
  workdir = f"{gcs_bucket}/runs/a"
  ck = ckpt_lib.Checkpointer(workdir, CFG)
  assert ck.directory == f"{workdir}/checkpoints"
  for s in (1, 2, 3):
    ck.save(s, _state(s), {"s": s})
  ck.close()
  assert io.listdir(f"{workdir}/checkpoints") == ["2", "3"]  # keep_last=2, nothing left behind locally
  # tensorstore wrote the arrays as objects in the bucket
  assert any(n.startswith("ocdbt") or n == "d" or n.endswith(".zarray") or n == "manifest.ocdbt"
             for n in io.listdir(f"{workdir}/checkpoints/3/state")), io.listdir(f"{workdir}/checkpoints/3/state")
  state, extra = ckpt_lib.Checkpointer(workdir, CFG).restore_latest(_state(0))
  assert int(state["step"]) == 3 and extra == {"s": 3}
  np.testing.assert_array_equal(state["params"]["w"], np.full((8, 4), 3.0))
  np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0) + 3)


def test_a_damaged_checkpoint_in_a_bucket_is_set_aside_and_the_previous_used(gcs_bucket, capfd):
  workdir = f"{gcs_bucket}/runs/b"
  ck = ckpt_lib.Checkpointer(workdir, CFG)
  for s in (1, 2):
    ck.save(s, _state(s), {"s": s})
  ck.close()
  io.write_text(f"{workdir}/checkpoints/2/extra/metadata", "{not json")
  ck = ckpt_lib.Checkpointer(workdir, CFG)
  state, extra = ck.restore_latest(_state(0))
  assert int(state["step"]) == 1 and extra == {"s": 1}
  assert "damaged" in capfd.readouterr().err
  assert io.listdir(f"{workdir}/checkpoints") == ["1"]
  assert [n.split("-")[0] for n in io.listdir(f"{workdir}/checkpoints.damaged")] == ["2"]
  ck.close()


def test_a_missing_bucket_is_one_sentence_before_training(gcs_server):
  with pytest.raises(CheckpointError, match=r"^The bucket gs://no-such-bucket-2 does not exist"):
    ckpt_lib.Checkpointer("gs://no-such-bucket-2/runs/a", CFG)
