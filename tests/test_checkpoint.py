"""Checkpointing and resumption with real processes: SIGKILL, SIGTERM, damaged checkpoints, other device
counts, two hosts, and the errors a user can cause.

Training runs are `python -m jaxreplay.cli pretrain` subprocesses on a tiny model (40 steps of 8×16 tokens);
they share a persistent compilation cache, so only the first one compiles.
"""

import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreplay.models import export as export_lib
from jaxreplay.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
TIMING_KEYS = {"elapsed_s", "tokens_per_s", "mfu"}  # wall-clock numbers: differ between any two runs

CONFIG = textwrap.dedent("""
    from jaxreplay import config as config_lib
    def get_config(arg=""):
      c = config_lib.default()
      c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
      c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=640)
      c.eval.update(every_tokens=1280, tokens=256, batch_size=8)
      c.checkpoint.update(every_steps=10, keep_last=2)
      c.log.update(every_steps=1, progress=False)
      c.stop.steps = {steps}
      c.data.path = {data!r}
      return c
""")

# Runs pieces of the library in a fresh process with its own device count (and, for `train`, as one of
# several jax.distributed processes).
DRIVER = textwrap.dedent("""
    import json, os, sys
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    import jax
    if args.get("coordinator"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(args["coordinator"], num_processes=args["num_processes"],
                                 process_id=args["process_id"])
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from jaxreplay import config as config_lib, sharding
    from jaxreplay.models import export as export_lib
    from jaxreplay.train import checkpoint as ckpt_lib
    from jaxreplay.train import optim
    from jaxreplay.models import decoder as M

    def make_config():
      c = config_lib.default()
      c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
      c.optim.update(batch_size=8, warmup_tokens=256)
      c.stop.steps = 10
      c.mesh.update(args["mesh"])
      return c

    def like_state(c, mesh, seed):
      # the train state's structure and shardings, filled with seeded numbers (built on the host: no compile)
      cfg = M.ModelConfig.from_config(c.model, "float32")
      opt = optim.make_optimizer(c, 10)
      def init(k):
        params = M.init_params(cfg, k)
        return dict(params=params, opt_state=opt.init(params), step=jnp.int32(7))
      abstract = jax.eval_shape(init, jax.random.key(0))
      sh = sharding.state_shardings(abstract, mesh)
      rng = np.random.default_rng(seed)
      def fill(a, s):
        x = rng.standard_normal(a.shape).astype(a.dtype) if a.dtype == np.float32 else np.full(a.shape, 7, a.dtype)
        return jax.make_array_from_callback(a.shape, s, lambda idx: x[idx])
      return jax.tree.map(fill, abstract, sh)

    def dump(tree, path):
      flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
      specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
               if hasattr(x.sharding, "spec")}
      np.savez(path, **flat)
      with open(path + ".json", "w") as f:
        json.dump(dict(specs=specs, devices=jax.device_count()), f)

    if mode == "train":
      from jaxreplay.train import preemption
      from jaxreplay.train import loop as train
      if args.get("step_delay"):  # slower steps: time for the coordination service to agree on a stop step
        import time
        reached = preemption.Preemption.reached
        preemption.Preemption.reached = lambda self, step: (time.sleep(args["step_delay"]), reached(self, step))[1]
      spec = __import__("importlib.util").util.spec_from_file_location("cfg", args["config"])
      module = __import__("importlib.util").util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config()
      c.update_from_flattened_dict(args.get("overrides", {}))
      print(json.dumps(train.run(c, args["workdir"])))
    else:
      c = make_config()
      mesh = sharding.make_mesh(c.mesh)
      state = like_state(c, mesh, args.get("seed", 0))
      ckpt_cfg = ml_collections.ConfigDict(dict(every_steps=1, every_minutes=0.0, keep_last=2,
                                                keep_every_steps=0, async_save=True))
      if mode == "save_state":
        ck = ckpt_lib.Checkpointer(args["workdir"], ckpt_cfg)
        ck.save(7, state, {"replay": {"position": 3}}, force=True)
        ck.close()
        dump(state, args["out"])
        export_lib.export(args["workdir"], state["params"], {}, {"step": 7})
      elif mode == "restore_state":
        ck = ckpt_lib.Checkpointer(args["workdir"], ckpt_cfg)
        restored, extra = ck.restore_latest(state)
        assert extra == {"replay": {"position": 3}}, extra
        dump(restored, args["out"])
        dump(export_lib.load_exported(args["workdir"], state["params"]), args["out"] + ".export.npz")
      elif mode == "load_export":
        params = export_lib.load_exported(args["workdir"], state["params"])
        dump(params, args["out"])
      elif mode == "hosts":  # one of several processes: save together, stop together on SIGTERM, restore
        import signal, time
        from jaxreplay.train import preemption
        ck = ckpt_lib.Checkpointer(args["workdir"], ckpt_cfg)
        ck.save(7, state, {"replay": {"position": 3}}, force=True)
        ck.close()
        saved = export_lib.integrity_record(state)
        timed = ckpt_lib.Checkpointer(args["workdir"], ml_collections.ConfigDict(dict(ckpt_cfg, every_steps=1000,
                                                                                       every_minutes=1e-9)))
        assert timed.should_save(10) and not timed.should_save(11)  # host 0's clock decides, every 10 steps
        timed.close()
        with preemption.Preemption() as p:
          for step in range(8, 10_000):
            time.sleep(0.01)
            if jax.process_index() == 1 and step == 12:
              os.kill(os.getpid(), signal.SIGTERM)
            if p.reached(step):
              break
        ck = ckpt_lib.Checkpointer(args["workdir"], ckpt_cfg)
        restored, extra = ck.restore_latest(like_state(c, mesh, seed=1))
        assert extra == {"replay": {"position": 3}} and export_lib.integrity_record(restored) == saved
        ck.save(step, restored, extra, force=True)
        ck.close()
        print(json.dumps(dict(stopped_at=step)))
""")


def kill_step(name: str, lo: int, hi: int) -> int:
  """The step a test interrupts at: spread over [lo, hi] across tests, and the same on every run of one."""
  return random.Random(name).randint(lo, hi)


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("ckpt")
  data = base / "tokens"
  data.mkdir()
  rng = np.random.default_rng(0)
  pattern = rng.integers(11, 64, size=97)  # a repeating pattern the model can learn
  for split, n in (("train", 20_000), ("valid", 2_000)):
    np.tile(pattern, n // 97 + 1)[:n].astype(np.uint16).tofile(data / f"{split}.bin")
  meta = dict(vocab_size=64, dtype="uint16", tokenizer_hash="0" * 64, dataset_id=0, name="t", train_tokens=20_000,
              valid_tokens=2_000, sources=[], valid_documents={}, eos_id=10)
  (data / "meta.json").write_text(json.dumps(meta))
  (base / "cfg.py").write_text(CONFIG.format(steps=STEPS, data=str(data)))
  (base / "driver.py").write_text(DRIVER)
  variables = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   # Shared across sessions: jax keys entries by program, flags and versions.
                   JAX_COMPILATION_CACHE_DIR=os.environ.get(
                       "JAXREPLAY_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "jaxreplay-test-jax-cache")),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  variables.pop("XLA_FLAGS", None)
  return dict(base=base, config=str(base / "cfg.py"), driver=str(base / "driver.py"), env=variables)


def _env(env, devices=1):
  e = dict(env["env"])
  if devices > 1:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def start(env, workdir, *overrides, devices=1, prefix=(), **kw):
  cmd = [*prefix, sys.executable, "-m", "jaxreplay.cli", "pretrain", f"--config={env['config']}", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(env, devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def finish(proc, timeout=180):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def train(env, workdir, *overrides, devices=1):
  code, out, err = finish(start(env, workdir, *overrides, devices=devices))
  assert code == 0, err[-3000:]
  return err


def driver(env, mode, devices=1, **args):
  out = subprocess.run([sys.executable, env["driver"], mode, json.dumps(args)], cwd=ROOT, env=_env(env, devices),
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
    return max((json.loads(l)["step"] for l in lines if l.endswith("}")), default=-1)
  except (OSError, ValueError):
    return -1


def wait_for(proc, condition, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def steps_saved(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def metrics(workdir, timing=False):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return rows if timing else [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def exported(workdir):
  tree = export_lib.load_exported(workdir)  # onto this process's one device, whatever layout saved it
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _strip(d):
  return {k.replace("['params']", ""): v for k, v in d.items()}


def assert_same_params(a, b, exact=True):
  a, b = _strip(a), _strip(b)
  assert a.keys() == b.keys()
  for k in a:
    if exact:
      assert np.array_equal(a[k], b[k]), f"{k} differs"
    else:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-4, err_msg=k)


def preempt(env, workdir, at_step, *overrides, devices=1):
  """Starts a run, sends SIGTERM once it has logged `at_step`, and returns (step it stopped at, stderr)."""
  proc = start(env, workdir, *overrides, devices=devices)
  wait_for(proc, lambda: logged_step(workdir) >= at_step, f"step {at_step}")
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code != 0 and "Preempted (SIGTERM)" in err, err[-2000:]
  return logged_step(workdir), err


def tree_snapshot(directory):
  return sorted((os.path.relpath(p, directory), os.path.getsize(p), os.path.getmtime(p))
                for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p))


@pytest.fixture(scope="module")
def reference(env):
  """The uninterrupted 40-step run."""
  workdir = str(env["base"] / "reference")
  err = train(env, workdir)
  assert "orbax" not in err.lower(), "orbax INFO lines leaked into the output"
  return workdir


@pytest.fixture(scope="module")
def preempted(env):
  """A run stopped by SIGTERM after its first two checkpoints (kept for copies; never resumed in place)."""
  workdir = str(env["base"] / "preempted")
  step, err = preempt(env, workdir, kill_step("preempted", 21, 35))
  return workdir, step


# ---------------------------------------------------------------- (a) SIGKILL

def test_sigkill_then_restart_equals_uninterrupted(env, reference):
  workdir = str(env["base"] / "killed")
  kill_at = kill_step("sigkill", 11, STEPS - 3)
  proc = start(env, workdir)
  wait_for(proc, lambda: 10 in steps_saved(workdir) and logged_step(workdir) >= kill_at, f"step {kill_at}")
  proc.kill()
  proc.wait()
  killed_at = logged_step(workdir)
  assert not os.path.exists(os.path.join(workdir, "final.json")), "the run finished before it was killed"
  train(env, workdir)
  assert_same_params(exported(workdir), exported(reference))
  assert metrics(workdir) == metrics(reference), f"logged metrics differ after a kill at step {killed_at}"
  final = {k: v for k, v in json.load(open(os.path.join(workdir, "final.json"))).items() if k not in TIMING_KEYS}
  ref = {k: v for k, v in json.load(open(os.path.join(reference, "final.json"))).items() if k not in TIMING_KEYS}
  assert final == ref


# ---------------------------------------------------------------- (b) SIGTERM

def test_sigterm_checkpoints_the_current_step_and_resume_repeats_none(env, reference, preempted):
  source, stopped_at = preempted
  assert steps_saved(source)[-1] == stopped_at, "no checkpoint at the step the run stopped at"
  with open(os.path.join(source, "checkpoints", str(stopped_at), "extra", "metadata")) as f:
    assert json.load(f)["elapsed_s"] > 0
  workdir = str(env["base"] / "sigterm")
  shutil.copytree(source, workdir)
  before = metrics(workdir, timing=True)
  train(env, workdir)
  after = metrics(workdir, timing=True)
  # Lines up to the stop are untouched (timings included), so no step was trained or logged twice.
  assert after[:len(before)] == before
  assert [r["step"] for r in after if "train_loss" in r] == list(range(1, STEPS + 1))
  assert_same_params(exported(workdir), exported(reference))
  assert metrics(workdir) == metrics(reference)


# ---------------------------------------------------------------- (c) damaged checkpoints

def test_truncated_latest_checkpoint_is_reported_and_the_previous_used(env, reference, preempted):
  source, stopped_at = preempted
  workdir = str(env["base"] / "damaged")
  shutil.copytree(source, workdir)
  previous = steps_saved(workdir)[-2]
  latest_dir = os.path.join(workdir, "checkpoints", str(stopped_at))
  data_files = [p for p in glob.glob(os.path.join(latest_dir, "state", "**", "d", "*"), recursive=True)]
  biggest = max(data_files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  err = train(env, workdir)
  # Only our own warning counts: orbax may also print an ignored-coroutine note that quotes the path.
  warnings = [l for l in err.splitlines() if l.startswith("jaxreplay: warning:") and "damaged" in l]
  assert len(warnings) == 1 and f"step {stopped_at}" in warnings[0] and f"step {previous}" in warnings[0], err
  assert os.listdir(os.path.join(workdir, "checkpoints.damaged"))  # kept for inspection, not deleted
  assert_same_params(exported(workdir), exported(reference))
  assert metrics(workdir) == metrics(reference)


def _tiny_state(v):
  return dict(params=dict(w=jnp.full((8, 4), v, jnp.float32), b=jnp.arange(3.0) + v), step=jnp.int32(v))


CKPT_CFG = ml_collections.ConfigDict(dict(every_steps=1, every_minutes=0.0, keep_last=3, keep_every_steps=0,
                                          async_save=True))


def _damage(step_dir, how):
  if how == "bad_json":
    with open(os.path.join(step_dir, "extra", "metadata"), "w") as f:
      f.write("{not json")
  elif how == "flipped_byte":
    f = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2] ^= 0xFF
    open(f, "wb").write(b)
  elif how == "bad_metadata":
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("{")
  elif how == "missing_state":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif how == "checksum":  # the arrays were read without error but are not what was saved
    path = os.path.join(step_dir, "integrity", "metadata")
    record = json.load(open(path))
    record["arrays"]["params.w"][0] += 1
    json.dump(record, open(path, "w"))


@pytest.mark.parametrize("how", ["bad_json", "flipped_byte", "bad_metadata", "missing_state", "checksum"])
def test_damaged_latest_checkpoint_falls_back_in_process(tmp_path, capfd, how):
  ck = ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG)
  for s in (1, 2):
    ck.save(s, _tiny_state(s), {"s": s})
  ck.close()
  _damage(str(tmp_path / "checkpoints" / "2"), how)
  ck = ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG)
  state, extra = ck.restore_latest(_tiny_state(0))
  assert int(state["step"]) == 1 and extra == {"s": 1}
  np.testing.assert_array_equal(state["params"]["w"], np.full((8, 4), 1.0))
  err = capfd.readouterr().err
  assert [l for l in err.splitlines() if l.strip()] == [l for l in err.splitlines() if "damaged" in l]
  assert "step 2" in err and "step 1" in err
  assert ck.latest_step() == 1 and os.listdir(str(tmp_path / "checkpoints.damaged"))
  ck.save(2, _tiny_state(2), {"s": 2}, force=True)  # the damaged step can be saved again
  ck.close()


def test_every_checkpoint_damaged_is_one_error_and_nothing_moved(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG)
  ck.save(1, _tiny_state(1), {"s": 1})
  ck.close()
  _damage(str(tmp_path / "checkpoints" / "1"), "bad_json")
  snapshot = tree_snapshot(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint in .* can be read"):
    ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG).restore_latest(_tiny_state(0))
  assert tree_snapshot(str(tmp_path)) == snapshot


def test_keep_policy_and_interval(tmp_path):
  cfg = ml_collections.ConfigDict(dict(every_steps=2, every_minutes=0.0, keep_last=2, keep_every_steps=4,
                                       async_save=True))
  ck = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  saved = [s for s in range(1, 11) if ck.save(s, _tiny_state(s), {})]
  ck.close()
  assert saved == [2, 4, 6, 8, 10]
  assert sorted(ck.manager.all_steps()) == [4, 8, 10]  # the last two plus every 4th
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))


def test_time_based_saves(tmp_path, monkeypatch):
  clock = [1000.0]  # the checkpointer's clock, moved by hand: a loaded machine cannot make this flaky
  monkeypatch.setattr(ckpt_lib, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
  cfg = ml_collections.ConfigDict(dict(every_steps=1000, every_minutes=0.002, keep_last=2, keep_every_steps=0,
                                       async_save=True))
  ck = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  clock[0] += 0.11
  assert not ck.save(1, _tiny_state(1), {})  # 0.12 s have not passed since the start
  clock[0] += 0.02
  assert ck.save(2, _tiny_state(2), {})
  clock[0] += 0.11
  assert not ck.save(3, _tiny_state(3), {})  # the clock restarts at a save
  ck.close()
  assert ck.manager.all_steps() == [2]


def test_checkpoint_of_other_model_is_one_error_and_untouched(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG)
  ck.save(1, _tiny_state(1), {})
  ck.close()
  snapshot = tree_snapshot(str(tmp_path))
  other = dict(params=dict(w=jnp.zeros((16, 4)), b=jnp.zeros(3)), step=jnp.int32(0))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"different model.*params.w has shape \(8, 4\) there"):
    ckpt_lib.Checkpointer(str(tmp_path), CKPT_CFG).restore_latest(other)
  assert tree_snapshot(str(tmp_path)) == snapshot


# ---------------------------------------------------------------- (d) other device counts

@pytest.mark.parametrize("save_on,restore_on", [((4, dict(data=1, fsdp=2, tensor=2)), (1, dict(data=1))),
                                                ((1, dict(data=1)), (4, dict(data=1, fsdp=2, tensor=2)))])
def test_state_restores_on_another_device_count(env, tmp_path, save_on, restore_on):
  workdir = str(tmp_path / "run")
  driver(env, "save_state", devices=save_on[0], workdir=workdir, mesh=save_on[1], out=str(tmp_path / "saved.npz"))
  driver(env, "restore_state", devices=restore_on[0], workdir=workdir, mesh=restore_on[1], seed=1,
         out=str(tmp_path / "restored.npz"))
  saved, restored = np.load(tmp_path / "saved.npz"), np.load(tmp_path / "restored.npz")
  assert_same_params(dict(saved), dict(restored))
  saved_params = {k: v for k, v in saved.items() if k.startswith("['params']")}
  assert_same_params(saved_params, dict(np.load(tmp_path / "restored.npz.export.npz")))  # exported weights too
  layout = json.load(open(tmp_path / "restored.npz.json"))
  assert layout["devices"] == restore_on[0]
  if restore_on[0] == 4:  # landed sharded on the new mesh, not replicated
    assert "fsdp" in layout["specs"]["['params']['embed']"] and "tensor" in layout["specs"]["['params']['embed']"]


def test_exported_weights_load_on_other_device_counts(env, reference, tmp_path):
  """Exported on 1 device, loaded on 4 (fsdp × tensor); then a run on 4 devices exported and loaded on 1."""
  driver(env, "load_export", devices=4, workdir=reference, mesh=dict(data=1, fsdp=2, tensor=2),
         out=str(tmp_path / "on4.npz"))
  assert_same_params(exported(reference), dict(np.load(tmp_path / "on4.npz")))


def test_preempted_run_resumes_on_two_devices(env, reference, preempted, tmp_path):
  """CI size of the two below: the 1-device run stopped by SIGTERM resumes with its batch split over 2 devices
  (the default data-parallel mesh), logs every step once and ends near the uninterrupted run."""
  workdir = str(tmp_path / "two")
  shutil.copytree(preempted[0], workdir)
  train(env, workdir, devices=2)
  steps = [r["step"] for r in metrics(workdir) if "train_loss" in r]
  assert steps == list(range(1, STEPS + 1)) and preempted[1] < STEPS
  assert_same_params(exported(workdir), exported(reference), exact=False)
  assert json.load(open(os.path.join(workdir, "final.json")))["step"] == STEPS


@pytest.mark.slow
def test_run_on_4_devices_resumes_on_1_and_exports_for_any_count(env, reference, tmp_path):
  # mesh fsdp=-1: parameters and optimizer state sharded over all 4 devices, then over the single one.
  mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=-1")
  workdir = str(tmp_path / "four")
  stopped_at, _ = preempt(env, workdir, kill_step("mesh4", 12, 30), *mesh, devices=4)
  train(env, workdir, *mesh, devices=1)
  assert [r["step"] for r in metrics(workdir) if "train_loss" in r] == list(range(1, STEPS + 1))
  assert_same_params(exported(workdir), exported(reference), exact=False)
  driver(env, "load_export", devices=1, workdir=workdir, mesh=dict(data=1), out=str(tmp_path / "on1.npz"))
  on1 = dict(np.load(tmp_path / "on1.npz"))
  assert_same_params(exported(workdir), on1)


@pytest.mark.slow
def test_run_on_1_device_resumes_on_4(env, reference, tmp_path):
  mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=-1")
  workdir = str(tmp_path / "one")
  preempt(env, workdir, kill_step("mesh1", 12, 30), *mesh, devices=1)
  train(env, workdir, *mesh, devices=4)
  assert_same_params(exported(workdir), exported(reference), exact=False)


# ---------------------------------------------------------------- (e) two processes

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_hosts(env, workdir, n=2, step_delay=0.0):
  coordinator = f"localhost:{_free_port()}"
  return [subprocess.Popen(
      [sys.executable, env["driver"], "train", json.dumps(dict(
          coordinator=coordinator, num_processes=n, process_id=i, config=env["config"], workdir=workdir,
          overrides={"mesh.data": -1}, step_delay=step_delay))],
      cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def test_two_processes_checkpoint_and_stop_together(env, tmp_path):
  """Two jax.distributed processes (one CPU device each, state sharded across them): save together, agree on
  the step to stop at when only one gets SIGTERM, restore together and save that step."""
  workdir = str(tmp_path / "hosts")
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, env["driver"], "hosts", json.dumps(dict(
      coordinator=coordinator, num_processes=2, process_id=i, workdir=workdir, mesh=dict(data=1, fsdp=2)))],
      cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [finish(p) for p in procs]
  for code, out, err in results:
    assert code == 0, err[-3000:]
  stops = {json.loads(out.strip().splitlines()[-1])["stopped_at"] for _, out, _ in results}
  assert len(stops) == 1
  assert steps_saved(workdir) == [7, stops.pop()]


@pytest.mark.slow
def test_two_processes_save_on_sigterm_and_restore_together(env, reference, tmp_path):
  workdir = str(tmp_path / "hosts")
  # Without the delay the two hosts can finish all 40 steps before the service has picked a stop step.
  procs = _start_hosts(env, workdir, step_delay=0.1)
  wait_for(procs[0], lambda: logged_step(workdir) >= 15, "step 15", timeout=150)
  procs[1].send_signal(signal.SIGTERM)  # one host is told; both must stop at the same step
  results = [finish(p) for p in procs]
  for code, out, err in results:
    assert code != 0 and "Preempted (SIGTERM)" in err, err[-2000:]
  stopped = {int(err.split("Preempted (SIGTERM) at step ")[1].split(":")[0]) for _, _, err in results}
  assert len(stopped) == 1 and steps_saved(workdir)[-1] == stopped.pop()
  results = [finish(p) for p in _start_hosts(env, workdir)]
  for code, out, err in results:
    assert code == 0, err[-3000:]
  finals = [{k: v for k, v in json.loads(out.strip().splitlines()[-1]).items() if k not in TIMING_KEYS}
            for _, out, _ in results]
  assert finals[0] == finals[1] and finals[0]["step"] == STEPS
  assert [r["step"] for r in metrics(workdir) if "train_loss" in r] == list(range(1, STEPS + 1))
  assert_same_params(exported(workdir), exported(reference), exact=False)


# ---------------------------------------------------------------- bad input

def test_missing_or_unfinished_init_from_is_one_error(env, preempted, tmp_path):
  from jaxreplay.train import loop as train
  c = _config(env)
  c.stage = "finetune"
  for source, message in ((str(tmp_path / "nowhere"), "does not exist"), (preempted[0], "holds no finished export")):
    c.init["from"] = source
    with pytest.raises(ckpt_lib.CheckpointError, match=message) as e:
      train.run(c, str(tmp_path / "ft"))
    assert source in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "ft" / "checkpoints")


def _config(env):
  spec = __import__("importlib.util").util.spec_from_file_location("cfg", env["config"])
  module = __import__("importlib.util").util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow  # compiles a second model in this process; the Checkpointer-level check above is fast
def test_checkpoints_of_a_different_shape_are_one_error_and_untouched(env, preempted, tmp_path):
  from jaxreplay.train import loop as train
  source, _ = preempted
  workdir = str(tmp_path / "other")
  shutil.copytree(source, workdir)
  os.remove(os.path.join(workdir, "config.json"))  # so only the checkpoints tell the runs apart
  snapshot = tree_snapshot(os.path.join(workdir, "checkpoints"))
  c = _config(env)
  c.model.d_model = 48
  with pytest.raises(ckpt_lib.CheckpointError, match="different model") as e:
    train.run(c, workdir)
  assert os.path.join(workdir, "checkpoints") in str(e.value) and "\n" not in str(e.value)
  assert tree_snapshot(os.path.join(workdir, "checkpoints")) == snapshot


def test_unwritable_checkpoint_directory_is_one_error_and_untouched(env, preempted, tmp_path):
  source, _ = preempted
  workdir = str(tmp_path / "readonly")
  shutil.copytree(source, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  snapshot = tree_snapshot(ckpts)
  prefix = ()
  if os.geteuid() == 0:  # root ignores permission bits unless it gives up CAP_DAC_OVERRIDE
    if not shutil.which("setpriv"):
      pytest.skip("running as root without setpriv: permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    prefix = ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}")
  os.chmod(ckpts, 0o555)
  try:
    code, out, err = finish(start(env, workdir, prefix=prefix))
  finally:
    os.chmod(ckpts, 0o755)
  lines = [l for l in err.splitlines() if l.startswith("jaxreplay:")]
  assert code == 2 and len(lines) == 1 and "Cannot write checkpoints" in lines[0] and ckpts in lines[0], err[-2000:]
  assert tree_snapshot(ckpts) == snapshot
