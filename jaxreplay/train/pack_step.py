"""The packed train step: K runs' states stacked on a leading axis, one jitted step vmapped (or, on a CPU,
looped) over them.

Values that differ between members enter the step as arrays ([K] hyperparameters, a [K, S] table of learning
rates), so one compiled program serves every member. Each member's update is the lone run's chain,
optim.adamw, built from that member's values (optim.hyperparams rounded to float32, as a lone run's Python
floats are), so a member's arithmetic and optimizer state are the lone run's.
With a `runs` mesh (runs_mesh) the stacked axis is sharded over its devices: each device steps its own members
(shard_map), looped or vmapped as on one device, so a member's arithmetic is the one-device pack's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreplay.train import optim
from jaxreplay.train.optim import adam_kind  # noqa: F401 (experiments.packing's name)


def member_hparams(c) -> dict:
  """One member's traced values: its optimizer's (optim.hyperparams) and its replay coefficient, float32."""
  coeff = float(c.replay.coeff) if c.init["from"] else 0.0
  return {k: np.float32(v) for k, v in dict(optim.hyperparams(c), coeff=coeff).items()}


def lr_table(c, total_steps: int, length: int) -> np.ndarray:
  """The member's learning rate at steps 0..length-1 (float32), from its own optim.lr_schedule; steps past
  its length repeat the last value (they are never applied: the member is frozen by then)."""
  schedule = optim.lr_schedule(c, total_steps)
  steps_S = np.minimum(np.arange(length), max(total_steps - 1, 0)).astype(np.int32)
  return np.asarray(jax.jit(jax.vmap(schedule))(steps_S), np.float32)


def make_packed_step(objective, kind: tuple, grad_clip: float, *, frozen_axis, replay_axis, traced_coeff: bool,
                     loop_members: bool = False, teacher_fn=None, mesh=None):
  """step(states, hparams, lr_KS, active_K, frozen, batch_KBT, replay, teacher) -> (states, aux [K]).

  frozen_axis / replay_axis: 0 when members have their own frozen model / replay rows, None when shared. When
  both are shared, vmap leaves the frozen model's forward on the replay rows unbatched: it runs once per step for
  every member (method kl without a sampled teacher).
  A member with active=False keeps its state unchanged (it has stopped, or stopped being trained).
  loop_members: lax.map over the members instead of vmap (platform.Choices.loop_pack_members).
  `teacher_fn(frozen, replay)`: the frozen model's logits on the replay rows (method kl without sampled ones);
  looping members that share both get them computed once, before the loop, as vmap leaves them unbatched.
  traced_coeff: the members' replay coefficients differ, so each gets its own from hparams; when they are all
  equal the objective's own constant is used, which XLA folds into the loss's scale factors as a lone run's
  is (a traced one rounds differently, by about one float32 ulp of the regulariser's gradient).
  mesh: a `runs` mesh (runs_mesh) whose devices share the members out, or None (one device).
  """

  def member(state, hp, lr_S, active, frozen, batch_BT, replay_BT, teacher_BTV):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    kw = dict(coeff=hp["coeff"]) if traced_coeff else {}
    (_, aux), grads = grad_fn(state["params"], frozen, batch_BT, replay_BT, teacher_BTV, **kw)
    lr = lr_S[jnp.minimum(state["step"], lr_S.shape[0] - 1)]
    tx = optim.adamw(kind, hp, grad_clip, lambda count: lr)  # count == step: the table's entry is the schedule's
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    aux["lr"] = lr
    new = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), aux

  def step(states, hparams, lr_KS, active_K, frozen, batch_KBT, replay, teacher):
    args = (states, hparams, lr_KS, active_K, frozen, batch_KBT, replay, teacher)
    axes = (0, 0, 0, 0, frozen_axis, 0, replay_axis, None if teacher is None else replay_axis)
    if not loop_members:
      return jax.vmap(member, in_axes=axes)(*args)
    if teacher is None and teacher_fn is not None and frozen_axis is None and replay_axis is None:
      args = (*args[:-1], teacher_fn(frozen, replay))
    per_member = tuple(a for a, ax in zip(args, axes) if ax == 0)

    def one(xs):  # member k's slices of the stacked arguments, the shared ones as they are
      it = iter(xs)
      return member(*[next(it) if ax == 0 else a for a, ax in zip(args, axes)])

    return jax.lax.map(one, per_member)

  if mesh is None:
    return step
  spec = lambda axis: P(RUNS) if axis == 0 else P()
  in_specs = (P(RUNS),) * 4 + (spec(frozen_axis), P(RUNS), spec(replay_axis), spec(replay_axis))
  return jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(RUNS), P(RUNS)), check_vma=False)


RUNS = "runs"


def runs_mesh(n_members: int, devices=None):
  """A 1-D `runs` mesh over as many of this process's devices as evenly share n_members (the most that divide
  it), or None where that is one device (the pack trains on one device) or the pack spans several processes."""
  devices = jax.local_devices() if devices is None else devices
  if jax.process_count() > 1:
    return None
  n = max(d for d in range(1, len(devices) + 1) if n_members % d == 0)
  return None if n == 1 else jax.make_mesh((n,), (RUNS,), axis_types=(jax.sharding.AxisType.Auto,),
                                           devices=devices[:n])


def put(tree, mesh, axis):
  """A stacked tree (axis 0) sharded over the runs mesh, or a shared one (axis None) replicated on it."""
  sh = NamedSharding(mesh, P(RUNS) if axis == 0 else P())
  return jax.tree.map(lambda x: jax.device_put(x, sh), tree)


def stack(trees):
  """The trees' leaves stacked on a new leading axis, on the host (jnp.stack would compile once per leaf shape);
  leaves on a mesh stay on it, replicated, as the one-device packed step returns them, so its second call does
  not compile again (with a runs mesh the pack puts them on it: put)."""
  def one(*xs):
    out = np.stack([np.asarray(x) for x in xs])
    sh = getattr(xs[0], "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
      return jax.device_put(out, jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec()))
    return jnp.asarray(out)
  return jax.tree.map(one, *trees)


@jax.jit
def unstack(tree, k):
  """Member k's slice of a stacked tree: one program for the whole tree (k traced), not one per leaf shape."""
  return jax.tree.map(lambda x: x[k], tree)
