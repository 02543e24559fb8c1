"""One training stage, pretraining or finetuning (a paper model, or a Hugging Face model on chat data): set up,
restore, loop, evaluate, log, checkpoint, stop, export.

`setup` builds the `Trainer`, what a run holds while it trains; `train_loop` steps it until a stop and
`Trainer.finish` ends it. Another loop drives Trainers through `inputs`, `after_step` and `finish` alone
(train/pack.py trains K stacked runs so). Data order and replay rows are pure functions of the step, so a
resumed run reads exactly the batches an uninterrupted one would. The train step compiles once per run; the
host syncs with the device only when it logs or evaluates.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from jaxreplay import config as config_lib, io, rundir, sharding
from jaxreplay.errors import TrainingError  # noqa: F401 (raised here; callers catch it as train.TrainingError)
from jaxreplay.io import write_json
from jaxreplay.evals import forgetting, mcq, toy
from jaxreplay.models import decoder, export as export_lib, hf_import
from jaxreplay.replay import sources as replay_lib
from jaxreplay.train import checkpoint as ckpt_lib, evaluation, metrics as metrics_lib, optim, steps
from jaxreplay.train import preemption as preemption_lib
from jaxreplay.train.stage import Stage


DONE_FILE = rundir.FINAL


def is_finished(workdir: str) -> bool:
  return rundir.is_finished(workdir)


def run(c, workdir: str, evaluators=()) -> dict:
  """Runs (or resumes, or returns the result of) one stage; returns the final metrics.

  `evaluators`: callables params -> {name: value}, run at every evaluation alongside the losses.
  """
  if is_finished(workdir):
    config_lib.check_workdir(c, workdir)
    return rundir.read_final(workdir)
  t = setup(c, workdir, evaluators)
  return t.finish(train_loop(t))


def task_evaluators(c, stage: Stage) -> list:
  """The evaluators a stage's config and data ask for: toy-task accuracies, lm-eval tasks, MCQ benchmarks."""
  out = []
  if stage.data_meta.get("toy"):  # toy continual tasks: greedy answer accuracy on every task at each eval
    out.append(toy.evaluator_for(c, stage.data_meta, c.data.path, stage.model_cfg))
  if c.eval.get("lm_eval_tasks") and not c.model.path:  # lm-evaluation-harness tasks (the `eval` extra)
    from jaxreplay.evals import lm_eval
    out.append(lm_eval.evaluator_for(c, stage.model_cfg, stage.dataset_id,
                                     os.path.join(c.data.path, "tokenizer.json")))
  if c.eval.mcq:  # multiple-choice benchmarks scored as chats
    out.append(mcq.evaluator_for(c, stage.model_cfg, stage.tokenizer, stage.mesh))
  return out


@dataclasses.dataclass(eq=False)
class Trainer:
  """What one run holds while it trains, built by `setup` alone; a loop drives it by `inputs`, `after_step` and
  `finish`. `step`: the last completed step; `extra`: saved with every checkpoint (best loss, elapsed seconds)."""
  c: Any
  workdir: str
  stage: Stage
  evaluators: tuple
  frozen: Any  # π_pre's weights, None when pretraining
  state: Any
  state_sh: Any
  extra: dict
  replay: Any  # the replay source, None without replay
  eval_sets: dict
  train_step: Callable
  eval_fn: Callable
  merged: Callable  # (trainable, frozen) -> the model's parameters
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  throughput: metrics_lib.Throughput
  bar: Any
  wall_start: float
  step: int
  last_eval: dict = dataclasses.field(default_factory=dict)
  last_eval_step: int | None = None
  batch_iter: Iterator | None = None

  def evaluate(self) -> dict:
    """Every eval set's losses and the evaluators' metrics, on the current (merged) parameters."""
    params = self.merged(self.state["params"], self.frozen)
    out = evaluation.evaluate_sets(self.eval_sets, self.eval_fn, params, self.frozen, self.stage.mesh)
    for evaluator in self.evaluators:  # task-specific metrics, e.g. the toy tasks' answer accuracy
      out.update(evaluator(params))
    return out

  def needs_start_eval(self) -> bool:
    return self.step == 0 and self.c.eval.at_start  # before the first step of a fresh run

  def evaluate_at_start(self, result: dict | None = None):
    """A fresh run's step-0 evaluation (eval.at_start), its first metrics row; `result`: the same evaluation
    already made on equal parameters (train/pack.py evaluates members that start equal once)."""
    self.last_eval = self.evaluate() if result is None else dict(result)
    self.last_eval_step = self.step
    self.writer.write(0, dict(tokens=0, **self.last_eval))

  def release_state(self):
    """Hands the state to the caller (a pack stacks its members'); `after_step` gives the run its new one."""
    state, self.state = self.state, None
    return state

  def inputs(self):
    """This step's training rows (host arrays), replay rows and teacher logits (global arrays, or None)."""
    if self.batch_iter is None:  # the first step since setup
      self.batch_iter = self.stage.batches.iterate(self.step)
      self.throughput.reset()
    _, batch = next(self.batch_iter)
    replay_BT, teacher_BTV = self.replay.next(self.step) if self.replay is not None else (None, None)
    return batch, replay_BT, teacher_BTV

  def logs(self, step: int) -> bool:
    return step % self.c.log.every_steps == 0 or step == self.stage.total_steps

  def after_step(self, state, aux: dict) -> str | None:
    """Takes a step's new state (a pack's view of its slice) and metrics (read on `logs` steps); logs, evaluates,
    returns the stop: 'length', 'target', 'target_loss', 'early_stop', 'wall_time' or None."""
    c, stage, self.state = self.c, self.stage, state
    step = self.step = self.step + 1
    self.throughput.tick()
    self.bar.update(1)
    self.extra["elapsed_s"] = time.monotonic() - self.wall_start
    row, stop_reason = {}, None
    if self.logs(step):
      aux = jax.device_get(aux)
      self.check_finite(aux)
      row.update({k: float(v) for k, v in aux.items()}, **self.throughput.report())
      self.bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    if step % stage.eval_every == 0 or step == stage.total_steps:
      self.last_eval, self.last_eval_step = self.evaluate(), step
      row.update(self.last_eval)
      stop_reason = evaluation.check_stops(c, self.last_eval, self.extra)
    if c.stop.wall_time_s and self.extra["elapsed_s"] >= c.stop.wall_time_s:
      stop_reason = "wall_time"
    if row:
      self.writer.write(step, dict(tokens=step * stage.tokens_per_step, elapsed_s=self.extra["elapsed_s"], **row))
    if stop_reason is None and stage.total_steps is not None and step >= stage.total_steps:
      stop_reason = "length"
    return stop_reason

  def check_finite(self, aux: dict):
    if not np.isfinite(aux["train_loss"]):
      self.close()
      raise TrainingError(f"The training loss became {aux['train_loss']} at step {self.step}: lower optim.lr "
                          f"(now {self.c.optim.lr}) or add optim.grad_clip; the last good checkpoint is kept in "
                          f"{self.checkpointer.directory}.")

  def finish(self, stop_reason: str, state=None, **extra) -> dict:
    """The final evaluation (unless the last step had one), checkpoint, export (and export.hf), metrics row and
    final.json, written last; returns the result. `state`: the final state, from a caller that holds it (a
    pack); `extra`: keys it adds to the result (the pack's size, its step's compiles)."""
    c, stage, step = self.c, self.stage, self.step
    self.state = self.state if state is None else state
    self.bar.close()
    if self.last_eval_step != step:
      self.last_eval = self.evaluate()
    final_params = self.merged(self.state["params"], self.frozen)
    result = dict(step=step, tokens=step * stage.tokens_per_step, stop_reason=stop_reason,
                  elapsed_s=self.extra["elapsed_s"], params_paper=stage.counts["paper"],
                  params_true=stage.counts["true"], train_step_compiles=self.train_step._cache_size(),
                  **self.last_eval)
    result.update(extra)
    if self.replay is not None:  # what replay.teacher='auto' resolved to
      result["replay_teacher"] = "sampled" if self.replay.sampled_teacher else "forward"
    if stage.prev is not None:
      result.update(forgetting.forgetting_metrics(c, final_params, self.frozen, result))
    self.checkpointer.save(step, self.state, self.extra, force=True)
    self.checkpointer.close()
    if stage.hf_dir and c.export.hf:
      hf_import.save_hf(final_params, stage.model_cfg, stage.hf_dir, os.path.join(self.workdir, rundir.HF))
    elif not stage.hf_dir:
      export_lib.export(self.workdir, final_params, c.to_dict(), dict(step=step, dataset_id=stage.dataset_id))
    self.writer.write(step, dict(final=True, **{k: v for k, v in result.items() if k != "step"}))
    self.writer.close()
    if jax.process_index() == 0:
      write_json(rundir.final_file(self.workdir), result, sort_keys=True)
    return result

  def close(self):
    self.checkpointer.close()
    self.bar.close()
    self.writer.close()


def load_frozen(stage: Stage, abstract_params, param_sh):
  """π_pre: the exported weights of init.from, a Hugging Face checkpoint's (model.path), or None (pretraining)."""
  if stage.hf_dir:
    return jax.device_put(hf_import.load_params(stage.hf_dir, stage.model_cfg, stage.mesh), param_sh)
  if stage.prev is not None:
    like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, param_sh)
    return export_lib.load_exported(stage.c.init["from"], like)
  return None


SHARED_PROGRAMS: dict = {}  # jitted programs that runs of one process with equal shapes share (a pack, a chain)


def shared(key, build):
  """The jitted program for `key`, built once per process, so a second run of the same shapes reuses its trace
  and compiled code (a fresh closure per run would be traced, lowered and compiled again)."""
  if key not in SHARED_PROGRAMS:
    SHARED_PROGRAMS[key] = build()
  return SHARED_PROGRAMS[key]


def replay_stream_key(c) -> tuple | None:
  """Runs with equal keys read the same replay rows at every step (None: no replay, or none known to share)."""
  r = c.replay
  if not c.init["from"] or r.method in ("none", "kl_downstream"):
    return None
  rows = r.batch_size or c.optim.batch_size
  if r.source == "real":
    return ("real", r.path or c.init["from"], c.seed, rows)
  return ("self", c.init["from"], c.seed, rows, r.buffer, r.temperature, r.top_k, r.top_p, r.dataset_id,
          str(r.prompt_ids), r.cache_dir)


class SharedSource:
  """A replay source that several runs read (a pack's members): each step's rows are made once."""

  def __init__(self, source):
    self.source, self.sampled_teacher, self.last = source, source.sampled_teacher, (None, None)

  def next(self, step: int):
    if self.last[0] != step:
      self.last = (step, self.source.next(step))
    return self.last[1]


def once(loaded: dict | None, key, load: Callable):
  """load(), or what a run set up before with the same `loaded` got for `key` (a pack's members share a frozen
  model and replay sources so); key None: never shared."""
  if loaded is None or key is None:
    return load()
  if key not in loaded:
    loaded[key] = load()
  return loaded[key]


def replay_source(c, stage: Stage, frozen, loaded: dict | None):
  """The run's replay source, or None; runs set up with one `loaded` share one per replay stream."""
  def load():
    source = replay_lib.make_source(
        c, stage.mesh, stage.model_cfg, frozen, real_rows=stage.real_rows, real_path=stage.real_path,
        real_dataset_id=stage.real_dataset_id, prompt_id=stage.prompt_id, weights_dir=stage.weights_dir)
    return source if source is None or loaded is None else SharedSource(source)
  stream = replay_stream_key(c)
  return once(loaded, stream and ("replay", stream, stage.model_cfg, stage.mesh), load)


def init_state(stage: Stage, optimizer, key, frozen, trainable_fn, merge_fn):
  """The fresh train state (new parameters, or the frozen weights' copy; LoRA adapters) and its shardings."""
  init_fn = lambda k, frozen: steps.init_state(stage.model_cfg, optimizer, k, trainable_fn, frozen)
  abstract = jax.eval_shape(init_fn, key, frozen)
  state_sh = sharding.state_shardings(abstract, stage.mesh)
  init = lambda: jax.jit(init_fn, out_shardings=state_sh)
  if merge_fn is None:
    # The optimizer's initial state depends on its structure (in `abstract`), never on its hyperparameters'
    # values, so runs of one model, mesh and state structure share one init (a LoRA one holds its run's key).
    init = shared(("init", stage.model_cfg, stage.mesh, frozen is None, jax.tree.structure(abstract),
                   tuple(jax.tree.leaves(abstract))), init)
  else:
    init = init()
  return init(key, frozen), state_sh


def compile_steps(stage: Stage, optimizer, state_sh, param_sh, frozen, merge_fn, replay):
  """(train step, eval step, parameter merge), jitted: the train step with explicit shardings, donated state."""
  c, mesh = stage.c, stage.mesh
  objective = steps.make_objective(stage.model_cfg, c.replay if frozen is not None else None, merge_fn)
  batch_sh = sharding.batch_sharding(mesh)
  if c.model.path:
    batch_sh = dict(tokens=batch_sh, mask=batch_sh, segments=batch_sh)
  replay_sh = sharding.batch_sharding(mesh) if replay is not None else None
  # The frozen model's logits on the replay rows when kept from sampling (replay.teacher): no forward of it.
  teacher_sh = sharding.batch_sharding(mesh, 3) if replay is not None and replay.sampled_teacher else None
  frozen_sh = param_sh if frozen is not None else None
  step = steps.make_train_step(objective, optimizer, optim.lr_schedule(c, stage.total_steps), c.train.microbatches)
  train_step = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh, replay_sh, teacher_sh),
                       out_shardings=(state_sh, None), donate_argnums=(0,))
  kl = frozen is not None
  eval_fn = shared(("eval", stage.model_cfg, kl), lambda: jax.jit(steps.make_eval_step(stage.model_cfg, kl)))
  return train_step, eval_fn, jax.jit(merge_fn) if merge_fn is not None else (lambda p, f: p)


def write_run_files(c, stage: Stage, workdir: str):
  """config.json, the tokenizer that reads the run's samples, and chat packing's data_stats.json (process 0)."""
  if jax.process_index() != 0:
    return
  config_lib.write(c, workdir)
  tokenizer = io.join(c.data.path or ".", "tokenizer.json")
  if c.data.path and io.exists(tokenizer):
    io.write_bytes(io.join(workdir, "tokenizer.json"), io.read_bytes(tokenizer))
  stage.write_data_stats()


def setup(c, workdir: str, evaluators=(), restore=None, start_eval: bool = True, loaded: dict | None = None
          ) -> Trainer:
  """The Trainer: everything before the first step (the stage, the run files, the state restored from the last
  checkpoint, the replay source, the forgetting probes, the compiled steps, the metric writer, the progress bar).

  `restore(fresh_state) -> (state, extra) | None` replaces reading the run's own checkpoints (train/pack.py
  restores its members from the pack's checkpoint). start_eval=False leaves the step-0 evaluation to the caller
  (Trainer.evaluate_at_start). Runs set up with one `loaded` dict (a pack's members) load each frozen model
  and replay stream once."""
  stage = Stage(c, workdir)
  ckpt_lib.check_writable(workdir)  # before anything is written
  evaluators = (*evaluators, *task_evaluators(c, stage))
  write_run_files(c, stage, workdir)
  mesh, model_cfg, key = stage.mesh, stage.model_cfg, jax.random.key(c.seed)
  optimizer = optim.make_optimizer(c, stage.total_steps)
  abstract_params = jax.eval_shape(lambda: decoder.init_params(model_cfg, key))
  param_sh = sharding.param_shardings(abstract_params, mesh)
  frozen = once(loaded, ("frozen", stage.weights_dir, model_cfg, mesh),
                lambda: load_frozen(stage, abstract_params, param_sh))
  trainable_fn, merge_fn = replay_lib.parameterization(c)
  state, state_sh = init_state(stage, optimizer, key, frozen, trainable_fn, merge_fn)
  checkpointer = ckpt_lib.Checkpointer(workdir, c.checkpoint)
  extra = dict(best=None, evals_since_best=0, elapsed_s=0.0)
  restored = (restore or checkpointer.restore_latest)(state)
  if restored is not None:
    state, extra = restored
  start_step = int(jax.device_get(state["step"]))
  replay = replay_source(c, stage, frozen, loaded)
  eval_sets = dict(stage.eval_sets)
  if c.eval.replay_rows and frozen is not None and stage.prompt_id >= 0:
    eval_sets["self"] = [evaluation.self_probe(c, model_cfg, frozen, stage.prompt_id, mesh)]
  train_step, eval_fn, merged = compile_steps(stage, optimizer, state_sh, param_sh, frozen, merge_fn, replay)
  peak = metrics_lib.cached_matmul_peak(model_cfg.dtype) if jax.process_index() == 0 else None
  t = Trainer(
      c=c, workdir=workdir, stage=stage, evaluators=evaluators, frozen=frozen, state=state, state_sh=state_sh,
      extra=extra, replay=replay, eval_sets=eval_sets, train_step=train_step, eval_fn=eval_fn, merged=merged,
      checkpointer=checkpointer, writer=metrics_lib.MetricWriter(workdir, c.log, c.to_dict(), resume_step=start_step),
      throughput=metrics_lib.Throughput(stage.tokens_per_step, decoder.flops_per_token(model_cfg), peak),
      bar=tqdm(total=stage.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (c.log.progress and jax.process_index() == 0),
               desc=os.path.basename(os.path.abspath(workdir))),
      wall_start=time.monotonic() - extra["elapsed_s"], step=start_step)
  checkpointer.before_save = t.writer.flush  # metrics.jsonl holds every row the checkpoint covers
  if start_eval and t.needs_start_eval():
    t.evaluate_at_start()
  return t


def train_loop(t: Trainer) -> str:
  """Steps from the restored one until a stop (Trainer.after_step's reasons). On SIGTERM (agreed on by every
  host) it saves a checkpoint and exits."""
  if t.stage.total_steps is not None and t.step >= t.stage.total_steps:
    return "length"
  with preemption_lib.Preemption() as preemption:
    while True:
      batch, replay_BT, teacher_BTV = t.inputs()
      state, aux = t.train_step(t.state, t.frozen, evaluation.put(batch, t.stage.mesh), replay_BT, teacher_BTV)
      stop_reason = t.after_step(state, aux)
      if preemption.reached(t.step):
        t.checkpointer.save(t.step, t.state, t.extra, force=True)
        t.close()
        raise SystemExit(f"Preempted (SIGTERM) at step {t.step}: saved a checkpoint; run the same command to resume.")
      if stop_reason:
        return stop_reason
      t.checkpointer.save(t.step, t.state, t.extra)
