"""The packed train step: K runs' states stacked on a leading axis, one jitted step vmapped (or, on a CPU,
looped) over them.

Values that differ between members enter the step as arrays ([K] hyperparameters, a [K, S] table of learning
rates), so one compiled program serves every member. The optimizer update below follows optim.make_optimizer's
chain (clip → Adam → decoupled weight decay → −lr) with those values traced instead of closed over (the accurate
Adam runs optim's own update; optax's Adam is restated, since it would compute 1 − β from a traced β); the
constants are rounded to float32 exactly as the lone optimizer rounds them (1−β in float64 first, as optax's
`(1 - decay)` does), and its state is the lone optimizer's state, so a member's arithmetic is the lone run's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreplay.train import optim

HPARAMS = ("b1", "omb1", "b2", "omb2", "log_b1", "log_b2", "eps", "weight_decay", "coeff")


def adam_kind(c) -> tuple:
  """What about Adam is compiled in, not traced: optax's arithmetic or the accurate one, and the latter's
  form of each moment update (by 1−β or by β). Members must agree on it."""
  (_, omb1), (_, omb2) = optim.decay_pair(c, "b1"), optim.decay_pair(c, "b2")
  if min(omb1, omb2) >= optim.MIN_ONE_MINUS_BETA_F32:
    return ("optax",)
  return ("accurate", omb1 <= 0.5, omb2 <= 0.5)


def member_hparams(c) -> dict:
  """One member's traced values, float32 scalars rounded from the float64 values the lone run uses."""
  (b1, omb1), (b2, omb2) = optim.decay_pair(c, "b1"), optim.decay_pair(c, "b2")
  coeff = float(c.replay.coeff) if c.init["from"] else 0.0
  values = dict(b1=b1, omb1=omb1, b2=b2, omb2=omb2, log_b1=optim.log_decay(omb1), log_b2=optim.log_decay(omb2),
                eps=float(c.optim.eps), weight_decay=float(c.optim.weight_decay), coeff=coeff)
  return {k: np.float32(values[k]) for k in HPARAMS}


def lr_table(c, total_steps: int, length: int) -> np.ndarray:
  """The member's learning rate at steps 0..length-1 (float32), from its own optim.lr_schedule; steps past
  its length repeat the last value (they are never applied: the member is frozen by then)."""
  schedule = optim.lr_schedule(c, total_steps)
  steps_S = np.minimum(np.arange(length), max(total_steps - 1, 0)).astype(np.int32)
  return np.asarray(jax.jit(jax.vmap(schedule))(steps_S), np.float32)


def _adam(grads, state: optax.ScaleByAdamState, hp: dict, kind: tuple):
  if kind[0] == "accurate":  # optim.scale_by_adam_accurate's own update, with the member's values
    ema1 = optim.ema_form(kind[1], hp["omb1"], hp["b1"])
    ema2 = optim.ema_form(kind[2], hp["omb2"], hp["b2"])
    return optim.accurate_adam_update(grads, state, ema1, ema2, hp["log_b1"], hp["log_b2"], hp["eps"])
  # optax.scale_by_adam restated with 1 - b given (optax would compute it from the traced b, in float32)
  count = optax.safe_increment(state.count)
  mu = jax.tree.map(lambda g, t: hp["omb1"] * (g**1) + hp["b1"] * t, grads, state.mu)
  nu = jax.tree.map(lambda g, t: hp["omb2"] * (g**2) + hp["b2"] * t, grads, state.nu)
  mu_hat = optax.tree.bias_correction(mu, hp["b1"], count)
  nu_hat = optax.tree.bias_correction(nu, hp["b2"], count)
  updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + hp["eps"]), mu_hat, nu_hat)
  nu = jax.tree.map(lambda v, old: v.astype(old.dtype), nu, state.nu)
  mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
  return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)


def optimizer_update(grads, opt_state: tuple, params, hp: dict, lr, kind: tuple, grad_clip: float):
  """optim.make_optimizer's update for one member, on its own (unchanged) state structure."""
  parts = list(opt_state)
  i = 0
  if grad_clip > 0:
    grads, parts[0] = optax.clip_by_global_norm(grad_clip).update(grads, parts[0])
    i = 1
  updates, parts[i] = _adam(grads, parts[i], hp, kind)
  updates = jax.tree.map(lambda g, p: g + hp["weight_decay"] * p, updates, params)
  step_size = -lr
  updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
  parts[i + 2] = optax.ScaleByScheduleState(count=optax.safe_increment(parts[i + 2].count))
  return updates, tuple(parts)


def make_packed_step(objective, kind: tuple, grad_clip: float, *, frozen_axis, replay_axis, traced_coeff: bool,
                     loop_members: bool = False, teacher_fn=None):
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
  """

  def member(state, hp, lr_S, active, frozen, batch_BT, replay_BT, teacher_BTV):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    kw = dict(coeff=hp["coeff"]) if traced_coeff else {}
    (_, aux), grads = grad_fn(state["params"], frozen, batch_BT, replay_BT, teacher_BTV, **kw)
    lr = lr_S[jnp.minimum(state["step"], lr_S.shape[0] - 1)]
    updates, opt_state = optimizer_update(grads, state["opt_state"], state["params"], hp, lr, kind, grad_clip)
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

  return step


def stack(trees):
  """The trees' leaves stacked on a new leading axis, on the host (jnp.stack would compile once per leaf shape);
  leaves on a mesh stay on it, replicated (a pack trains on one device), as the packed step returns them, so
  its second call does not compile again."""
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
