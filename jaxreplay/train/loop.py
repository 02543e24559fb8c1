"""One training stage, pretraining or finetuning: set up, restore, loop, evaluate, log, checkpoint, stop.

Data order is a pure function of the step, so a resumed run reads exactly the batches an uninterrupted one
would. The train step compiles once per run; the host syncs with the device only when it logs or evaluates.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxreplay.io import write_json
from jaxreplay.errors import TrainingError
from jaxreplay.train import checkpoint as ckpt_lib
from jaxreplay import config as config_lib
from jaxreplay.train import metrics as metrics_lib
from jaxreplay.models import decoder
from jaxreplay.train import optim
from jaxreplay.train import preemption as preemption_lib
from jaxreplay import sharding
from jaxreplay.train import steps
from jaxreplay.data import loader, tokenfile


DONE_FILE = "final.json"


def check_workdir(c, workdir: str):
  """Refuses a workdir that holds a different run, before anything is written."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  diff = config_lib.differences(config_lib.from_json_file(path), c)
  if diff:
    raise config_lib.ConfigError(
        f"The workdir {workdir} holds a run with a different config ({', '.join(diff[:5])} differ): "
        "use a new --workdir, or the same config to resume it.")


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, DONE_FILE))


class Stage:
  """Everything one run needs, resolved from the config before the first step."""

  def __init__(self, c, workdir: str):
    config_lib.validate(c)
    check_workdir(c, workdir)
    self.c, self.workdir = c, workdir
    self.mesh = sharding.make_mesh(c.mesh)
    dtype = config_lib.compute_dtype_name(c, jax.default_backend())
    self.model_cfg = decoder.ModelConfig.from_config(c.model, dtype, jax.default_backend())
    self.counts = decoder.param_counts(self.model_cfg)
    self.prev = None  # the pretraining run a finetuning run starts from
    if c.init["from"]:
      self.prev = config_lib.ml_collections.ConfigDict(ckpt_lib.exported_config(c.init["from"]))
      self._check_same_model(self.prev)

    # Data.
    M, T, B = c.model, c.model.seq_len, c.optim.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    div = sharding.batch_divisor(self.mesh)
    if B % (div * pc) and B % div:
      raise config_lib.ConfigError(f"config.optim.batch_size={B} is not divisible by the {div} data-parallel "
                                   "devices: choose a multiple of mesh.data × mesh.fsdp.")
    prev_hash = None
    if self.prev is not None:  # downstream data must share the pretrained model's tokenizer
      prev_hash = tokenfile.read_meta(self.prev.data.path)["tokenizer_hash"]
    data = tokenfile.open_token_dir(c.data.path, M.vocab_size, T, tokenizer_hash=prev_hash)
    self.data = data
    self.dataset_id = c.data.dataset_id if c.data.dataset_id >= 0 else int(data.meta["dataset_id"])
    mix = None
    if c.data.mix_fraction:
      mix_dir = tokenfile.open_token_dir(c.data.mix_path, M.vocab_size, T)
      mix = (c.data.mix_path, c.data.mix_fraction, int(mix_dir.meta["dataset_id"]))
    self.batches = loader.TrainBatches(c.data.path, T, B, c.seed, self.dataset_id, process_index=pi,
                                       process_count=pc, mix=mix, prefetch=c.data.prefetch)
    self.eval_sets = {"valid": self._eval_set(c.data.path, self.dataset_id)}
    if mix is not None:
      self.eval_sets["mix"] = self._eval_set(mix[0], mix[2])
    if self.prev is not None:
      self.prev_data_path = self.prev.data.path
      self.prev_dataset_id = (self.prev.data.dataset_id if self.prev.data.dataset_id >= 0 else
                              int(tokenfile.open_token_dir(self.prev_data_path, M.vocab_size, T).meta["dataset_id"]))
      self.eval_sets["prev"] = self._eval_set(self.prev_data_path, self.prev_dataset_id)

    # Length.
    self.tokens_per_step = config_lib.tokens_per_step(c)
    self.total_steps = self._total_steps()
    self.eval_every = max(1, round(c.eval.every_tokens / self.tokens_per_step))

  def _check_same_model(self, prev):
    for key in config_lib.weight_model_keys(prev.model.to_dict()):
      if key in self.c.model and prev.model[key] != self.c.model[key]:
        raise config_lib.ConfigError(
            f"config.model.{key}={self.c.model[key]} differs from the run in init.from "
            f"({prev.model[key]}): finetuning keeps the pretrained model's shape, so drop the override.")

  def _eval_set(self, path, dataset_id):
    c = self.c
    return loader.eval_batches(path, "valid", c.model.seq_len, c.eval.batch_size, c.eval.tokens, dataset_id,
                               process_index=jax.process_index(), process_count=jax.process_count())

  def _total_steps(self) -> int | None:
    s, tps = self.c.stop, self.tokens_per_step
    if s.steps:
      return int(s.steps)
    if s.tokens:
      tokens = s.tokens
    elif s.tokens_per_param:
      tokens = s.tokens_per_param * self.counts[self.c.model.param_count]
    elif s.epochs:
      tokens = s.epochs * self.batches.tokens_per_epoch
    else:
      return None
    return max(1, int(round(tokens / tps)))


def inherit_parent_shape(c, init_from: str, explicit=()):
  """`jaxreplay finetune`: every model key the weights in init_from depend on comes from that run's export,
  unless the user set it (`explicit`) to another value, which is an error."""
  parent = ckpt_lib.exported_config(init_from)
  conflicts = config_lib.inherit_model_shape(c, parent, explicit)
  if conflicts:
    k = conflicts[0]
    raise config_lib.ConfigError(
        f"config.model.{k}={c.model[k]!r} differs from the run in init.from ({parent['model'][k]!r}): finetuning "
        f"keeps the pretrained model's shape, so drop --config.model.{k}.")


def _eval(stage, eval_fn, params, frozen) -> dict:
  out = {}
  for name, batches in stage.eval_sets.items():
    sums = None
    for batch in batches:
      r = eval_fn(params, frozen, sharding.put_batch(np.asarray(batch), stage.mesh))
      sums = r if sums is None else jax.tree.map(jnp.add, sums, r)
    sums = jax.device_get(sums)
    out[f"{name}_ntp"] = float(sums["nll"] / sums["count"])
    out[f"{name}_ntp_h2"] = float(sums["nll_h2"] / sums["count_h2"])
    if "kl" in sums:
      out[f"{name}_kl"] = float(sums["kl"] / sums["count"])
  return out


def run(c, workdir: str, evaluators=()) -> dict:
  """Runs (or resumes, or returns the result of) one stage; returns the final metrics.

  `evaluators`: callables params -> {name: value}, run at every evaluation alongside the losses.
  """
  if is_finished(workdir):
    check_workdir(c, workdir)
    with open(os.path.join(workdir, DONE_FILE)) as f:
      return json.load(f)
  stage = Stage(c, workdir)
  ckpt_lib.check_writable(workdir)  # before anything is written
  if stage.data.meta.get("toy"):  # toy continual tasks: greedy answer accuracy on every task at each eval
    from jaxreplay.evals import toy
    evaluators = (*evaluators, toy.evaluator_for(c, stage.data.meta, c.data.path, stage.model_cfg))
  if c.eval.get("lm_eval_tasks"):  # lm-evaluation-harness tasks at every evaluation (the `eval` extra)
    from jaxreplay.evals import lm_eval as lm_eval_adapter
    evaluators = (*evaluators, lm_eval_adapter.evaluator_for(
        c, stage.model_cfg, stage.dataset_id, os.path.join(c.data.path, "tokenizer.json")))
  if jax.process_index() == 0:
    config_lib.write(c, workdir)
    tokenizer = os.path.join(c.data.path, "tokenizer.json")
    if os.path.exists(tokenizer):  # every run carries the tokenizer that reads its samples
      shutil.copyfile(tokenizer, os.path.join(workdir, "tokenizer.json"))
  from jaxreplay.replay import sources as replay_lib  # finetuning pieces; imported here to keep pretraining light

  mesh, model_cfg = stage.mesh, stage.model_cfg
  lr_schedule = optim.lr_schedule(c, stage.total_steps)
  optimizer = optim.make_optimizer(c, stage.total_steps)
  key = jax.random.key(c.seed)

  # Parameters: fresh for pretraining; the exported weights (and a frozen copy, π_pre) for finetuning.
  abstract_params = jax.eval_shape(lambda: decoder.init_params(model_cfg, key))
  param_sh = sharding.param_shardings(abstract_params, mesh)
  frozen = None
  if stage.prev is not None:
    like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, param_sh)
    frozen = ckpt_lib.load_exported(c.init["from"], like)
  trainable_fn, merge_fn = replay_lib.parameterization(c, frozen)

  def init_fn(k, frozen_params):
    params = frozen_params if frozen_params is not None else decoder.init_params(model_cfg, k)
    params = trainable_fn(params)
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

  abstract_state = jax.eval_shape(init_fn, key, frozen)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  frozen_sh = param_sh if frozen is not None else None
  state = jax.jit(init_fn, out_shardings=state_sh)(key, frozen)

  checkpointer = ckpt_lib.Checkpointer(workdir, c.checkpoint)
  extra = dict(best=None, evals_since_best=0, elapsed_s=0.0)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, extra = restored
  start_step = int(jax.device_get(state["step"]))

  replay = replay_lib.make_source(c, stage, frozen, extra.get("replay"))
  objective = steps.make_objective(model_cfg, c.replay if stage.prev is not None else None, merge_fn)
  batch_sh = sharding.batch_sharding(mesh)
  replay_sh = batch_sh if replay is not None else None
  # The frozen model's logits on the replay rows when kept from sampling (replay.teacher): no forward of it.
  teacher_sh = sharding.batch_sharding(mesh, 3) if replay is not None and replay.sampled_teacher else None
  train_step = jax.jit(steps.make_train_step(objective, optimizer, lr_schedule),
                       in_shardings=(state_sh, frozen_sh, batch_sh, replay_sh, teacher_sh),
                       out_shardings=(state_sh, None), donate_argnums=(0,))
  eval_fn = jax.jit(steps.make_eval_step(model_cfg, with_kl=frozen is not None))
  merged = jax.jit(merge_fn) if merge_fn is not None else (lambda p, f: p)

  writer = metrics_lib.MetricWriter(workdir, c.log, c.to_dict(), resume_step=start_step)
  peak = metrics_lib.cached_matmul_peak(model_cfg.dtype) if jax.process_index() == 0 else None
  throughput = metrics_lib.Throughput(stage.tokens_per_step, decoder.flops_per_token(model_cfg), peak)
  bar = tqdm(total=stage.total_steps, initial=start_step, disable=not (c.log.progress and jax.process_index() == 0),
             desc=os.path.basename(os.path.abspath(workdir)), unit="step", dynamic_ncols=True)

  def evaluate(step) -> dict:
    params = merged(state["params"], frozen)
    out = _eval(stage, eval_fn, params, frozen)
    for evaluator in evaluators:  # task-specific metrics, e.g. the toy tasks' answer accuracy
      out.update(evaluator(params))
    return out

  stop_reason, step, wall_start = None, start_step, time.monotonic() - extra["elapsed_s"]
  last_eval = {}
  if start_step == 0 and c.eval.at_start:
    last_eval = evaluate(0)
    writer.write(0, dict(tokens=0, **last_eval))

  with preemption_lib.Preemption() as preemption:
    batch_iter = stage.batches.iterate(start_step)
    throughput.reset()
    while True:
      if stage.total_steps is not None and step >= stage.total_steps:
        stop_reason = stop_reason or "length"
        break
      _, batch = next(batch_iter)
      replay_BT, teacher_BTV = replay.next(step) if replay is not None else (None, None)
      state, aux = train_step(state, frozen, sharding.put_batch(batch, mesh), replay_BT, teacher_BTV)
      step += 1
      throughput.tick()
      bar.update(1)
      extra["elapsed_s"] = time.monotonic() - wall_start
      row = {}
      if step % c.log.every_steps == 0 or step == stage.total_steps:
        aux = jax.device_get(aux)
        if not np.isfinite(aux["train_loss"]):
          checkpointer.close()
          raise TrainingError(f"The training loss became {aux['train_loss']} at step {step}: lower optim.lr "
                              f"(now {c.optim.lr}) or add optim.grad_clip; the last good checkpoint is kept in "
                              f"{checkpointer.directory}.")
        row.update({k: float(v) for k, v in aux.items()}, **throughput.report())
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
      if step % stage.eval_every == 0 or step == stage.total_steps:
        last_eval = evaluate(step)
        row.update(last_eval)
        stop_reason = _check_eval_stops(c, last_eval, extra)
      if c.stop.wall_time_s and extra["elapsed_s"] >= c.stop.wall_time_s:
        stop_reason = "wall_time"
      if row:
        writer.write(step, dict(tokens=step * stage.tokens_per_step, elapsed_s=extra["elapsed_s"], **row))
      if replay is not None:
        extra["replay"] = replay.state()
      if preemption.reached(step):  # SIGTERM, agreed on by every host
        checkpointer.save(step, state, extra, force=True)
        checkpointer.close()
        bar.close()
        writer.close()
        raise SystemExit(f"Preempted (SIGTERM) at step {step}: saved a checkpoint; run the same command to resume.")
      if stop_reason:
        break
      checkpointer.save(step, state, extra)
  bar.close()

  if not last_eval or row.get("valid_ntp") is None:
    last_eval = evaluate(step)
  final_params = merged(state["params"], frozen)
  result = dict(step=step, tokens=step * stage.tokens_per_step, stop_reason=stop_reason,
                elapsed_s=extra["elapsed_s"], params_paper=stage.counts["paper"], params_true=stage.counts["true"],
                train_step_compiles=train_step._cache_size(), **last_eval)
  if replay is not None:  # what replay.teacher='auto' resolved to
    result["replay_teacher"] = "sampled" if replay.sampled_teacher else "forward"
  if frozen is not None:
    from jaxreplay.evals import forgetting as evaluate_lib
    result.update(evaluate_lib.forgetting_metrics(c, final_params, frozen, result))
  checkpointer.save(step, state, extra, force=True)
  checkpointer.close()
  ckpt_lib.export(workdir, final_params, c.to_dict(), dict(step=step, dataset_id=stage.dataset_id))
  writer.write(step, dict(final=True, **{k: v for k, v in result.items() if k != "step"}))
  writer.close()
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, DONE_FILE), result, sort_keys=True)
  return result


def _check_eval_stops(c, ev: dict, extra: dict):
  loss = ev["valid_ntp"]
  if c.stop.target_loss and loss <= c.stop.target_loss:
    return "target_loss"
  if extra["best"] is None or loss < extra["best"]:
    extra["best"], extra["evals_since_best"] = loss, 0
  else:
    extra["evals_since_best"] += 1
  if c.stop.early_stop_evals and extra["evals_since_best"] >= c.stop.early_stop_evals:
    return "early_stop"
  return None
