"""One training stage, pretraining or finetuning (a paper model, or a Hugging Face model on chat data): set up,
restore, loop, evaluate, log, checkpoint, stop, export.

`run` is three public pieces that other loops reuse (train/pack.py trains K stacked runs with them):
`setup` (everything up to the first step, restored from the last checkpoint), `train_loop` (the steps, until a
stop), `finish` (final evaluation, export, final.json). Data order and replay rows are pure functions of the
step, so a resumed run reads exactly the batches an uninterrupted one would. The train step compiles once per
run; the host syncs with the device only when it logs or evaluates.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from tqdm import tqdm

from jaxreplay import config as config_lib, io, rundir, sharding
from jaxreplay.errors import TrainingError  # noqa: F401 (raised here; callers catch it as train.TrainingError)
from jaxreplay.io import write_json
from jaxreplay.evals import forgetting as evaluate_lib, mcq, toy
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
  stop_reason = train_loop(t)
  return finish(t, stop_reason)


def task_evaluators(c, stage: Stage) -> list:
  """The evaluators a stage's config and data ask for: toy-task accuracies, lm-eval tasks, MCQ benchmarks."""
  out = []
  if stage.data_meta.get("toy"):  # toy continual tasks: greedy answer accuracy on every task at each eval
    out.append(toy.evaluator_for(c, stage.data_meta, c.data.path, stage.model_cfg))
  if c.eval.get("lm_eval_tasks") and not c.model.path:  # lm-evaluation-harness tasks (the `eval` extra)
    from jaxreplay.evals import lm_eval as lm_eval_adapter
    out.append(lm_eval_adapter.evaluator_for(c, stage.model_cfg, stage.dataset_id,
                                             os.path.join(c.data.path, "tokenizer.json")))
  if c.eval.mcq:  # multiple-choice benchmarks scored as chats
    out.append(mcq.evaluator_for(c, stage.model_cfg, stage.tokenizer, stage.mesh))
  return out


class Trainer:
  """One stage's live pieces between `setup` and `finish`: the stage, the state and frozen weights, the jitted
  steps, the replay source, the checkpointer and the writers. `step` is the last completed step.
  `result_extra`: keys another loop adds to final.json (train/pack.py: the pack's size)."""
  result_extra: dict = {}
  last_eval_step: int | None = None

  def evaluate(self) -> dict:
    """Every eval set's losses and the evaluators' metrics, on the current (merged) parameters."""
    params = self.merged(self.state["params"], self.frozen)
    out = evaluation.evaluate_sets(self.eval_sets, self.eval_fn, params, self.frozen, self.stage.mesh)
    for evaluator in self.evaluators:  # task-specific metrics, e.g. the toy tasks' answer accuracy
      out.update(evaluator(params))
    return out

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


def init_state(t: Trainer, key):
  """The train state (fresh, or the frozen weights' copy; LoRA adapters) restored from the last checkpoint."""
  stage, c = t.stage, t.c
  trainable_fn, t.merge_fn = replay_lib.parameterization(c)
  init_fn = lambda k, frozen: steps.init_state(stage.model_cfg, t.optimizer, k, trainable_fn, frozen)
  abstract = jax.eval_shape(init_fn, key, t.frozen)
  t.state_sh = sharding.state_shardings(abstract, stage.mesh)
  init = lambda: jax.jit(init_fn, out_shardings=t.state_sh)
  if t.merge_fn is None:
    # The optimizer's initial state depends on its structure (in `abstract`), never on its hyperparameters'
    # values, so runs of one model, mesh and state structure share one init (a LoRA one holds its run's key).
    init = shared(("init", stage.model_cfg, stage.mesh, t.frozen is None, jax.tree.structure(abstract),
                   tuple(jax.tree.leaves(abstract))), init)
  else:
    init = init()
  t.state = init(key, t.frozen)
  t.checkpointer = ckpt_lib.Checkpointer(t.workdir, c.checkpoint)
  t.extra = dict(best=None, evals_since_best=0, elapsed_s=0.0)
  restored = (t.restore or t.checkpointer.restore_latest)(t.state)
  if restored is not None:
    t.state, t.extra = restored
  t.start_step = t.step = int(jax.device_get(t.state["step"]))


def compile_steps(t: Trainer):
  """The jitted train step (explicit shardings, donated state), eval step and parameter merge."""
  stage, c, mesh = t.stage, t.c, t.stage.mesh
  objective = steps.make_objective(stage.model_cfg, c.replay if t.frozen is not None else None, t.merge_fn)
  batch_sh = sharding.batch_sharding(mesh)
  if c.model.path:
    batch_sh = dict(tokens=batch_sh, mask=batch_sh, segments=batch_sh)
  replay_sh = sharding.batch_sharding(mesh) if t.replay is not None else None
  # The frozen model's logits on the replay rows when kept from sampling (replay.teacher): no forward of it.
  teacher_sh = sharding.batch_sharding(mesh, 3) if t.replay is not None and t.replay.sampled_teacher else None
  frozen_sh = t.param_sh if t.frozen is not None else None
  step = steps.make_train_step(objective, t.optimizer, optim.lr_schedule(c, stage.total_steps), c.train.microbatches)
  t.train_step = jax.jit(step, in_shardings=(t.state_sh, frozen_sh, batch_sh, replay_sh, teacher_sh),
                         out_shardings=(t.state_sh, None), donate_argnums=(0,))
  kl = t.frozen is not None
  t.eval_fn = shared(("eval", stage.model_cfg, kl), lambda: jax.jit(steps.make_eval_step(stage.model_cfg, kl)))
  t.merged = jax.jit(t.merge_fn) if t.merge_fn is not None else (lambda p, f: p)


def write_run_files(c, stage: Stage, workdir: str):
  """config.json, the tokenizer that reads the run's samples, and chat packing's data_stats.json (process 0)."""
  if jax.process_index() != 0:
    return
  config_lib.write(c, workdir)
  tokenizer = io.join(c.data.path or ".", "tokenizer.json")
  if c.data.path and io.exists(tokenizer):
    io.write_bytes(io.join(workdir, "tokenizer.json"), io.read_bytes(tokenizer))
  stage.write_data_stats()


def needs_start_eval(t: Trainer) -> bool:
  return t.start_step == 0 and t.c.eval.at_start


def evaluate_at_start(t: Trainer, result: dict | None = None):
  """A fresh run's step-0 evaluation (eval.at_start), its first metrics row; `result`: the same evaluation already
  made on equal parameters (train/pack.py evaluates members that start equal once)."""
  t.last_eval = t.evaluate() if result is None else dict(result)
  t.writer.write(0, dict(tokens=0, **t.last_eval))


def setup(c, workdir: str, evaluators=(), restore=None, start_eval: bool = True) -> Trainer:
  """Everything before the first step: the stage, the run files, the state restored from the last checkpoint,
  the replay source, the forgetting probes, the compiled steps, the metric writer and the progress bar.

  `restore(fresh_state) -> (state, extra) | None` replaces reading the run's own checkpoints (train/pack.py
  restores its members from the pack's checkpoint). start_eval=False leaves the step-0 evaluation to the caller
  (evaluate_at_start)."""
  t = Trainer()
  t.c, t.workdir, t.restore = c, workdir, restore
  t.stage = stage = Stage(c, workdir)
  ckpt_lib.check_writable(workdir)  # before anything is written
  t.evaluators = (*evaluators, *task_evaluators(c, stage))
  write_run_files(c, stage, workdir)
  mesh, model_cfg, key = stage.mesh, stage.model_cfg, jax.random.key(c.seed)
  t.optimizer = optim.make_optimizer(c, stage.total_steps)
  abstract_params = jax.eval_shape(lambda: decoder.init_params(model_cfg, key))
  t.param_sh = sharding.param_shardings(abstract_params, mesh)
  t.frozen = load_frozen(stage, abstract_params, t.param_sh)
  init_state(t, key)
  t.replay = replay_lib.make_source(
      c, mesh, model_cfg, t.frozen, real_rows=stage.real_rows, real_path=stage.real_path,
      real_dataset_id=stage.real_dataset_id, prompt_id=stage.prompt_id, weights_dir=stage.weights_dir)
  t.eval_sets = dict(stage.eval_sets)
  if c.eval.replay_rows and t.frozen is not None and stage.prompt_id >= 0:
    t.eval_sets["self"] = [evaluation.self_probe(c, model_cfg, t.frozen, stage.prompt_id, mesh)]
  compile_steps(t)
  t.writer = metrics_lib.MetricWriter(workdir, c.log, c.to_dict(), resume_step=t.start_step)
  t.checkpointer.before_save = t.writer.flush  # metrics.jsonl holds every row the checkpoint covers
  peak = metrics_lib.cached_matmul_peak(model_cfg.dtype) if jax.process_index() == 0 else None
  t.throughput = metrics_lib.Throughput(stage.tokens_per_step, decoder.flops_per_token(model_cfg), peak)
  t.bar = tqdm(total=stage.total_steps, initial=t.start_step, unit="step", dynamic_ncols=True,
               disable=not (c.log.progress and jax.process_index() == 0),
               desc=os.path.basename(os.path.abspath(workdir)))
  t.last_eval, t.wall_start = {}, time.monotonic() - t.extra["elapsed_s"]
  if start_eval and needs_start_eval(t):
    evaluate_at_start(t)
  return t


def check_finite(t: Trainer, aux: dict):
  if not np.isfinite(aux["train_loss"]):
    t.checkpointer.close()
    raise TrainingError(f"The training loss became {aux['train_loss']} at step {t.step}: lower optim.lr "
                        f"(now {t.c.optim.lr}) or add optim.grad_clip; the last good checkpoint is kept in "
                        f"{t.checkpointer.directory}.")


def after_step(t: Trainer, aux) -> str | None:
  """Logging, evaluation and the stops after step `t.step`; returns the stop reason, if any."""
  c, stage, step = t.c, t.stage, t.step
  t.throughput.tick()
  t.bar.update(1)
  t.extra["elapsed_s"] = time.monotonic() - t.wall_start
  row, stop_reason = {}, None
  if step % c.log.every_steps == 0 or step == stage.total_steps:
    aux = jax.device_get(aux)
    check_finite(t, aux)
    row.update({k: float(v) for k, v in aux.items()}, **t.throughput.report())
    t.bar.set_postfix(loss=f"{row['train_loss']:.3f}")
  if step % stage.eval_every == 0 or step == stage.total_steps:
    t.last_eval = t.evaluate()
    t.last_eval_step = step
    row.update(t.last_eval)
    stop_reason = evaluation.check_stops(c, t.last_eval, t.extra)
  if c.stop.wall_time_s and t.extra["elapsed_s"] >= c.stop.wall_time_s:
    stop_reason = "wall_time"
  if row:
    t.writer.write(step, dict(tokens=step * stage.tokens_per_step, elapsed_s=t.extra["elapsed_s"], **row))
  return stop_reason


def train_loop(t: Trainer) -> str:
  """Steps from the restored one until a stop: 'length', 'target', 'target_loss', 'early_stop', 'wall_time'.
  On SIGTERM (agreed on by every host) it saves a checkpoint and exits."""
  stage, mesh = t.stage, t.stage.mesh
  t.last_eval_step = t.step if t.last_eval else None
  with preemption_lib.Preemption() as preemption:
    batch_iter = stage.batches.iterate(t.step)
    t.throughput.reset()
    while True:
      if stage.total_steps is not None and t.step >= stage.total_steps:
        return "length"
      _, batch = next(batch_iter)
      replay_BT, teacher_BTV = t.replay.next(t.step) if t.replay is not None else (None, None)
      t.state, aux = t.train_step(t.state, t.frozen, evaluation.put(batch, mesh), replay_BT, teacher_BTV)
      t.step += 1
      stop_reason = after_step(t, aux)
      if preemption.reached(t.step):
        t.checkpointer.save(t.step, t.state, t.extra, force=True)
        t.close()
        raise SystemExit(f"Preempted (SIGTERM) at step {t.step}: saved a checkpoint; run the same command to resume.")
      if stop_reason:
        return stop_reason
      t.checkpointer.save(t.step, t.state, t.extra)


def finish(t: Trainer, stop_reason: str) -> dict:
  """The final evaluation (unless the last step had one), checkpoint, export (and export.hf), metrics row and
  final.json, written last; returns the result."""
  c, stage, step = t.c, t.stage, t.step
  t.bar.close()
  if t.last_eval_step != step:
    t.last_eval = t.evaluate()
  final_params = t.merged(t.state["params"], t.frozen)
  result = dict(step=step, tokens=step * stage.tokens_per_step, stop_reason=stop_reason,
                elapsed_s=t.extra["elapsed_s"], params_paper=stage.counts["paper"], params_true=stage.counts["true"],
                train_step_compiles=t.train_step._cache_size(), **t.last_eval, **t.result_extra)
  if t.replay is not None:  # what replay.teacher='auto' resolved to
    result["replay_teacher"] = "sampled" if t.replay.sampled_teacher else "forward"
  if stage.prev is not None:
    result.update(evaluate_lib.forgetting_metrics(c, final_params, t.frozen, result))
  t.checkpointer.save(step, t.state, t.extra, force=True)
  t.checkpointer.close()
  if stage.hf_dir and c.export.hf:
    hf_import.save_hf(final_params, stage.model_cfg, stage.hf_dir, os.path.join(t.workdir, rundir.HF))
  elif not stage.hf_dir:
    export_lib.export(t.workdir, final_params, c.to_dict(), dict(step=step, dataset_id=stage.dataset_id))
  t.writer.write(step, dict(final=True, **{k: v for k, v in result.items() if k != "step"}))
  t.writer.close()
  if jax.process_index() == 0:
    write_json(rundir.final_file(t.workdir), result, sort_keys=True)
  return result
