"""A pack: several runs of one shape trained together as one program, each still a run of its own.

Every member is a loop.Trainer set up by `loop.setup` as a lone run and driven through its own methods
(`inputs`, `after_step`, `finish`), so it writes what a lone run writes in its own workdir at its own stop.
Only the step differs: the members' states are stacked on a leading axis and trained by one step, vmapped over
them (looped on a CPU; train/pack_step.py); a member that stops or fails (NaN loss) is frozen by masking. The
pack is checkpointed as a whole in its own directory (the stacked state and every member's extra), so a killed
pack resumes every member from the same step.
Members set up with one `loaded` dict load each frozen model (init.from) and replay stream once.
Programs are compiled once per pack, not per member (loop.shared), and members that start equal share their
step-0 evaluation.
Where this process has several devices, the stacked axis is sharded over a `runs` mesh of the most of them that
divide the members evenly (pack_step.runs_mesh): each device trains its own members; with one, nothing changes.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay import platform as platform_lib
from jaxreplay.errors import ConfigError, TrainingError
from jaxreplay.io import write_json
from jaxreplay.models import decoder
from jaxreplay.train import checkpoint as ckpt_lib, loop, optim, pack_step, preemption as preemption_lib, steps

PACK_FILE = "pack.json"  # in the pack's directory: its members, in order


class PackError(ConfigError):
  """The runs given cannot train as one pack; the message says why and what to do."""


def eval_sets_key(c) -> tuple:
  """The config values a run's eval sets and evaluators follow (its data's, the previous run's, its probes')."""
  d = c.data
  return (d.path, d.dataset_id, d.mix_path, d.mix_fraction, c.model.seq_len, c.init["from"],
          json.dumps(c.eval.to_dict(), sort_keys=True, default=str), c.seed if c.eval.replay_rows else None)


def equal_trees(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
                                    for x, y in zip(map(np.asarray, la), map(np.asarray, lb)))


class LazyMember(dict):
  """Member k's view of the stacked state, sliced when read (after_step reads it only to evaluate)."""

  def __init__(self, pack, k: int):
    super().__init__()
    self.pack, self.k = pack, k

  def __getitem__(self, key):
    return self.pack.member(self.k, key)


class Pack:
  def __init__(self, configs: list, workdirs: list[str], pack_dir: str):
    self.configs, self.workdirs, self.dir = configs, workdirs, pack_dir
    self.K = len(configs)
    self.checkpointer = ckpt_lib.Checkpointer(pack_dir, configs[0].checkpoint)
    self.restored = None  # (stacked state, extra) of the pack's checkpoint, read at the first member's setup
    self.results: list = [None] * self.K
    self.trainers: list = [None] * self.K
    self.loaded: dict = {}  # the frozen models and replay sources of the members (loop.setup loads each once)

  def member(self, k: int, key: str):
    """Member k's slice of state[key], on the shardings a lone run's state has (so the programs that read it, such
    as the shared eval program, see the arguments a lone run passes and compile once)."""
    return jax.device_put(pack_step.unstack(self.state[key], k), self.trainers_sh[k][key])

  def _restore_member(self, k: int):
    def restore(fresh):
      if self.restored is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # _stack places it on the runs mesh, if any
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.K, *x.shape), x.dtype, sharding=one), fresh)
        self.restored = self.checkpointer.restore_latest(like) or False
      if not self.restored:
        return None
      state, extra = self.restored
      return pack_step.unstack(state, k), extra["members"][k]
    return restore

  def setup(self):
    for k, (c, wd) in enumerate(zip(self.configs, self.workdirs)):
      if loop.is_finished(wd):
        self.results[k] = loop.run(c, wd)  # reads final.json
        continue
      t = loop.setup(c, wd, restore=self._restore_member(k), start_eval=False, loaded=self.loaded)
      if t.stage.total_steps is None:
        raise PackError(f"Run {wd} has no fixed length: a pack needs each member's length; train it alone "
                        "(--pack=1).")
      self.trainers[k] = t
    self.failed = {int(k): v for k, v in (self.restored[1].get("failed", {}) if self.restored else {}).items()}
    for k, msg in self.failed.items():
      self.results[k] = TrainingError(msg)
      if self.trainers[k] is not None:
        self.trainers[k].close()
        self.trainers[k] = None
    live = [t for t in self.trainers if t is not None]
    if not live:
      return
    self._check(live)
    self._evaluate_at_start(live)
    self._stack(live)
    self._compile(live)

  def _evaluate_at_start(self, live):
    """Members that start from equal parameters (one seed's init, one frozen model's copy), with one frozen model
    and the same eval sets, are evaluated at step 0 once: the same program on the same values, so the same bits."""
    done = []  # (key, member evaluated, its result)
    for t in live:
      if not t.needs_start_eval():
        continue
      key = (id(t.frozen), eval_sets_key(t.c))
      result = next((ev for k, u, ev in done if k == key and equal_trees(u.state["params"], t.state["params"])),
                    None)
      if result is None:
        result = t.evaluate()
        done.append((key, t, result))
      t.evaluate_at_start(result)

  def _check(self, live):
    """Refuses members of different programs; finds which frozen models and replay sources they share."""
    first = live[0]
    for t in live:
      if (t.stage.model_cfg != first.stage.model_cfg or t.stage.tokens_per_step != first.stage.tokens_per_step
          or optim.adam_kind(t.c) != optim.adam_kind(first.c) or (t.replay is None) != (first.replay is None)
          or (t.frozen is None) != (first.frozen is None)):
        raise PackError(f"Runs {first.workdir} and {t.workdir} differ in their program, so they cannot train as "
                        "one pack: group runs with experiments.packing, which keeps them apart.")
    n_frozen = len({id(t.frozen) for t in live})
    self.n_streams = len({id(t.replay) for t in live if t.replay is not None})
    self.frozen_axis = None if n_frozen <= 1 else 0
    self.frozen = first.frozen if n_frozen <= 1 else pack_step.stack([(t or first).frozen for t in self.trainers])
    self.replay_axis = None if self.n_streams <= 1 else 0
    self.sampled_teacher = bool(first.replay is not None and first.replay.sampled_teacher)

  def _stack(self, live):
    first = live[0]
    placeholder = lambda k: self.trainers[k] or first
    self.length = max(t.stage.total_steps for t in live)
    states = {k: t.release_state() for k, t in enumerate(self.trainers) if t is not None}
    if self.restored:
      self.state, extra = self.restored
      self.step = int(extra["pack_step"])
      self.extras = extra["members"]
    else:
      self.state = pack_step.stack([states.get(k, states[min(states)]) for k in range(self.K)])
      self.step = 0
      self.extras = [placeholder(k).extra for k in range(self.K)]
    self.hparams = pack_step.stack([pack_step.member_hparams(placeholder(k).c) for k in range(self.K)])
    self.lr_KS = jnp.asarray(np.stack([pack_step.lr_table(placeholder(k).c, placeholder(k).stage.total_steps,
                                                          self.length) for k in range(self.K)]))
    self.trainers_sh = [placeholder(k).state_sh for k in range(self.K)]
    self.mesh = pack_step.runs_mesh(self.K)
    if self.mesh is not None:  # each member's state, values and frozen model (its own, or all's) on its device(s)
      self.state, self.hparams, self.lr_KS = (pack_step.put(x, self.mesh, 0)
                                              for x in (self.state, self.hparams, self.lr_KS))
      self.frozen = pack_step.put(self.frozen, self.mesh, self.frozen_axis)
    self.views = {k: LazyMember(self, k) for k in states}  # what each member's after_step gets as its state

  def _compile(self, live):
    c0 = live[0].c
    objective = steps.make_objective(live[0].stage.model_cfg, c0.replay if live[0].frozen is not None else None)
    traced = len({float(t.c.replay.coeff) for t in live}) > 1
    model_cfg = live[0].stage.model_cfg
    teacher_fn = ((lambda frozen, rows: decoder.logits(model_cfg, frozen, rows))
                  if c0.replay.method == "kl" and live[0].frozen is not None and not self.sampled_teacher else None)
    loop_members = platform_lib.choices(jax.default_backend()).loop_pack_members
    step = pack_step.make_packed_step(objective, optim.adam_kind(c0), float(c0.optim.grad_clip),
                                      frozen_axis=self.frozen_axis, replay_axis=self.replay_axis,
                                      traced_coeff=traced, loop_members=loop_members, teacher_fn=teacher_fn,
                                      mesh=self.mesh)
    self.train_step = jax.jit(step, donate_argnums=(0,))

  # ----------------------------------------------------------------------------------------------- steps

  def _inputs(self):
    """The members' training rows, stacked, and replay rows: one stream's, or each member's stacked."""
    inputs = [t.inputs() if t is not None else None for t in self.trainers]
    first = next(i for i in inputs if i is not None)
    pick = [i or first for i in inputs]  # a stopped member's rows are any (its step is masked)
    batch = jnp.asarray(np.stack([np.asarray(p[0]) for p in pick]))
    if first[1] is None or self.replay_axis is None:
      return self._put((batch, 0), (first[1], None), (first[2], None))
    teacher = jnp.stack([p[2] for p in pick]) if self.sampled_teacher else None
    return self._put((batch, 0), (jnp.stack([p[1] for p in pick]), 0), (teacher, 0))

  def _put(self, *values_axes):
    """The step's inputs as they are on one device, or on the runs mesh (stacked ones sharded, shared ones not)."""
    if self.mesh is None:
      return tuple(v for v, _ in values_axes)
    return tuple(pack_step.put(v, self.mesh, axis) for v, axis in values_axes)

  def _extra(self) -> dict:
    for k, t in enumerate(self.trainers):
      if t is not None:
        self.extras[k] = t.extra
    return dict(pack_step=self.step, members=self.extras, failed={str(k): v for k, v in self.failed.items()})

  def _after_step(self, aux) -> bool:
    """Each member's after_step with its state and metrics, and finish at its stop; returns whether one stopped
    or failed (a NaN loss fails that member alone)."""
    host, changed = None, False
    for k, t in enumerate(self.trainers):
      if t is None:
        continue
      if t.logs(self.step) and host is None:
        host = jax.device_get(aux)
      try:
        reason = t.after_step(self.views[k], {key: v[k] for key, v in host.items()} if t.logs(self.step) else {})
      except TrainingError as e:  # the member has closed its writers
        self.failed[k], self.results[k] = str(e), e
        self.trainers[k], changed = None, True
        continue
      if reason:
        self.extras[k] = t.extra
        self.results[k] = t.finish(reason, {key: self.member(k, key) for key in self.state}, pack_members=self.K,
                                   pack_replay_streams=self.n_streams,
                                   train_step_compiles=self.train_step._cache_size())  # the pack's program
        self.trainers[k], changed = None, True
    return changed

  def train(self) -> list:
    with preemption_lib.Preemption() as preemption:
      while any(t is not None for t in self.trainers):
        batch, rows, teacher = self._inputs()
        (active,) = self._put((jnp.asarray([t is not None for t in self.trainers]), 0))
        self.state, aux = self.train_step(self.state, self.hparams, self.lr_KS, active, self.frozen, batch, rows,
                                          teacher)
        self.step += 1
        changed = self._after_step(aux)
        if preemption.reached(self.step):
          self.checkpointer.save(self.step, self.state, self._extra(), force=True)
          self.close()
          raise SystemExit(f"Preempted (SIGTERM) at step {self.step}: saved the pack's checkpoint; run the same "
                           "command to resume.")
        # A stop or failure is saved at once, so the checkpoint always agrees with the members' final.json.
        self.checkpointer.save(self.step, self.state, self._extra(), force=changed)
    self.close()
    return self.results

  def close(self):
    self.checkpointer.close()
    for t in self.trainers:
      if t is not None:
        t.close()


def run_pack(configs: list, workdirs: list[str], pack_dir: str) -> list:
  """Trains the runs as one pack; returns each member's final metrics, or the TrainingError it failed with."""
  os.makedirs(pack_dir, exist_ok=True)
  path = os.path.join(pack_dir, PACK_FILE)
  record = dict(members=[os.path.abspath(w) for w in workdirs])
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f)["members"] != record["members"]:
        raise PackError(f"The pack directory {pack_dir} holds another pack's checkpoints: use a new directory.")
  else:
    write_json(path, record)
  if all(loop.is_finished(w) for w in workdirs):
    return [loop.run(c, w) for c, w in zip(configs, workdirs)]
  pack = Pack(configs, workdirs, pack_dir)
  pack.setup()
  if all(t is None for t in pack.trainers):
    pack.close()
    return pack.results
  return pack.train()
