"""A sharded mesh must compute the same training trajectory as one device."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxreplay.errors import MeshError
from jaxreplay import config as config_lib
from jaxreplay import sharding

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jaxreplay import config as config_lib, sharding
    from jaxreplay.train import optim
    from jaxreplay.train import steps
    from jaxreplay.models import decoder as M
    data, fsdp, tensor = map(int, sys.argv[1:4])
    c = config_lib.default()
    c.model.update(d_model=64, n_layers=2, head_dim=16, seq_len=16, vocab_size=64)
    c.optim.update(batch_size=8, warmup_tokens=256)
    c.stop.steps = 10
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    mesh = sharding.make_mesh(c.mesh)
    cfg = M.ModelConfig.from_config(c.model, "float32")
    opt = optim.make_optimizer(c, 10)
    init = lambda k: steps.init_state(cfg, opt, k)
    abstract = jax.eval_shape(init, jax.random.key(0))
    sh = sharding.state_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=sh)(jax.random.key(0))
    obj = steps.make_objective(cfg, None)
    step = jax.jit(steps.make_train_step(obj, opt, optim.lr_schedule(c, 10)),
                   in_shardings=(sh, None, sharding.batch_sharding(mesh), None), out_shardings=(sh, None),
                   donate_argnums=(0,))
    tokens = jax.random.randint(jax.random.key(1), (10, 8, 16), 0, 64)
    losses = []
    for i in range(10):
      state, aux = step(state, None, sharding.put_batch(jax.device_get(tokens[i]), mesh), None)
      losses.append(float(aux["train_loss"]))
    specs = {k: str(v.sharding.spec) for k, v in state["params"]["blocks"].items()}
    print(json.dumps(dict(losses=losses, specs=specs, devices=len(jax.devices()),
                          compiles=step._cache_size())))
""")


def _run(devices, mesh):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, mesh)], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_device_mesh_matches_one_device():
  one = _run(1, (1, 1, 1))
  eight = _run(8, (2, 2, 2))
  assert eight["devices"] == 8
  assert eight["specs"]["q_proj"] == str(jax.sharding.PartitionSpec(None, "fsdp", "tensor", None))
  assert eight["specs"]["down_proj"] == str(jax.sharding.PartitionSpec(None, "tensor", "fsdp"))
  assert eight["compiles"] == 1
  for a, b in zip(one["losses"], eight["losses"]):
    assert abs(a - b) / abs(a) <= 1e-5, (one["losses"], eight["losses"])
  assert one["losses"][-1] < one["losses"][0]


def test_mesh_errors_name_the_fix():
  c = config_lib.default()
  c.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(MeshError, match="config.mesh"):
    sharding.make_mesh(c.mesh)
  c.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(MeshError, match="Only one mesh axis"):
    sharding.make_mesh(c.mesh)


def test_indivisible_dims_stay_replicated():
  """On a 2×2×2 mesh (abstract: the specs depend only on the axis sizes, so one CPU device suffices), a dim
  the axis size divides is sharded and one it does not divide stays replicated."""
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)
  P = jax.sharding.PartitionSpec
  spec = lambda name, shape: sharding.param_spec((jax.tree_util.DictKey(name),), shape, mesh)
  assert spec("embed", (20, 64)) == P("tensor", "fsdp")  # both divisible
  assert spec("embed", (19, 64)) == P(None, "fsdp")  # odd vocabulary: replicated over tensor only
  assert spec("up_proj", (2, 63, 256)) == P(None, None, "tensor")  # stacked layers, odd D
  assert spec("q_proj", (2, 64, 3, 16)) == P(None, "fsdp", None, None)  # 3 heads over tensor=2
  one = jax.sharding.AbstractMesh((1, 1, 1), sharding.AXES)
  assert sharding.param_spec((jax.tree_util.DictKey("embed"),), (20, 64), one) == P(None, None)
