"""A pack sharded over a `runs` mesh (simulated CPU devices) trains members equal to lone runs.

The pack runs in a subprocess with 4 simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=4),
twice: sharded over `runs` (each device steps its own member with shard_map, looped as on one CPU device), and on
one device as before (pack_step.runs_mesh off). The two compare bitwise: sharding changes no member's arithmetic.
The lone runs run in this process, on its one device, and compare within RTOL/ATOL: XLA:CPU in a process of
several devices rounds ~1 float32 ulp differently from a one-device process, with or without the runs mesh
(measured: either pack in a 2-device process differs from the lone runs by at most 9e-8 on weights of scale 0.2
after 4 steps), and a member's evaluation runs on its lone run's mesh, data=4 there, which sums in another order.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxreplay.io import read_metrics
from jaxreplay.models import export as export_lib
from jaxreplay.train import loop, pack_step

from helpers import tiny_config, two_datasets

RTOL, ATOL = 2e-5, 2e-6  # test_pack.py's bound for a vmapped pack, also a matter of summation order
TESTS = os.path.dirname(os.path.abspath(__file__))

PACK_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  sys.path.insert(0, sys.argv[1])
  from helpers import tiny_config
  from jaxreplay.train import pack, pack_step
  spec = json.loads(sys.argv[2])
  assert len(jax.devices()) == 4, jax.devices()

  def train(suffix):  # the pack, with its step recorded
    configs = []
    for m in spec["members"]:
      c = tiny_config(spec["data"], steps=m["steps"])
      c.seed, c.optim.lr = m["seed"], m["lr"]
      configs.append(c)
    p = pack.Pack(configs, [d + suffix for d in spec["dirs"]], spec["pack_dir"] + suffix)
    p.setup()
    seen, step = [], p.train_step
    def recorded(*args):
      out = step(*args)
      seen.append([(x.sharding.mesh.shape_tuple, tuple(x.sharding.spec)[:1]) for x in jax.tree.leaves(out)])
      return out
    recorded._cache_size = step._cache_size
    p.train_step = recorded
    results = p.train()
    ok = all(mesh == (("runs", 4),) and s == ("runs",) for leaves in seen for mesh, s in leaves)
    return dict(results=results, sharded=ok, steps=len(seen), compiles=step._cache_size(),
                dirs=[d + suffix for d in spec["dirs"]])

  sharded = train("")
  sizes = {n: dict(pack_step.runs_mesh(n).shape) for n in (2, 6, 8)}  # the most devices that share n evenly
  pack_step.runs_mesh = lambda n: None  # the pack on one device, as before
  print(json.dumps([sharded, train("_one"), sizes]))
""")


def run_packs_on_4_devices(spec) -> list:
  """[the pack sharded over `runs`, the pack on one device], trained in one process of 4 CPU devices, and the
  runs mesh's size for packs of 2, 6 and 8 there."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PACK_SCRIPT, TESTS, json.dumps(spec)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def metrics(workdir):
  rows = read_metrics(workdir)
  return ([(r["step"], r["lr"], r["train_loss"]) for r in rows if "train_loss" in r],
          [(r["step"], r["valid_ntp"]) for r in rows if "valid_ntp" in r])


def test_pack_sharded_over_runs_mesh_equals_one_device_pack_and_lone_runs(tmp_path):
  data = two_datasets(tmp_path / "data")
  members = [dict(seed=s, lr=lr, steps=n) for s, lr, n in ((0, 1e-2, 5), (1, 3e-3, 3), (2, 1e-2, 5), (3, 5e-3, 4))]
  spec = dict(data=str(data["a"]), members=members, runs=4, dirs=[str(tmp_path / f"member{k}") for k in range(4)],
              pack_dir=str(tmp_path / "pack"))
  got, one, sizes = run_packs_on_4_devices(spec)
  assert sizes == {"2": {"runs": 2}, "6": {"runs": 3}, "8": {"runs": 4}}
  assert got["sharded"] and got["steps"] == 5 and got["compiles"] == 1  # every step's outputs over `runs`
  assert not one["sharded"]  # the one-device pack's are not: the comparison is against the path of today
  for k, m in enumerate(members):
    c = tiny_config(str(data["a"]), steps=m["steps"])
    c.seed, c.optim.lr = m["seed"], m["lr"]
    lone_dir, member_dir, one_dir = str(tmp_path / f"lone{k}"), got["dirs"][k], one["dirs"][k]
    lone, member = loop.run(c, lone_dir), got["results"][k]
    assert member["step"] == lone["step"] == m["steps"] and member["pack_members"] == 4
    assert {key: v for key, v in member.items() if key != "elapsed_s"} == \
        {key: v for key, v in one["results"][k].items() if key != "elapsed_s"}
    weights = [jax.tree.leaves(export_lib.load_exported(d)) for d in (lone_dir, member_dir, one_dir)]
    for x, y, z in zip(*weights):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=RTOL, atol=ATOL)
    (train_a, evals_a), (train_b, evals_b), (train_c, evals_c) = map(metrics, (lone_dir, member_dir, one_dir))
    assert train_b == train_c and evals_b == evals_c
    assert [r[:2] for r in train_a] == [r[:2] for r in train_b]  # steps and learning rates, bitwise
    np.testing.assert_allclose([r[2] for r in train_b], [r[2] for r in train_a], rtol=RTOL)
    assert [e[0] for e in evals_a] == [e[0] for e in evals_b]
    np.testing.assert_allclose([e[1] for e in evals_b], [e[1] for e in evals_a], rtol=RTOL, atol=ATOL)


def test_runs_mesh_takes_the_most_devices_that_share_the_members_evenly():
  devices = [object()] * 8  # only counted: a mesh is built where more than one device is taken
  assert pack_step.runs_mesh(1, devices[:1]) is None and pack_step.runs_mesh(7, devices[:4]) is None
  assert pack_step.runs_mesh(3, devices[:1]) is None and pack_step.runs_mesh(5, devices[:4]) is None
