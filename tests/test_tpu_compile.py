"""`jaxreplay compile`: a run's programs compiled by the real TPU compiler for abstract TPU slices, on the CPU.

Needs libtpu (`pip install 'jax[tpu]==JAX_VERSION'`, with JAX_PLATFORMS=cpu as conftest sets): the tests that
compile skip without it, saying so; the bad-input tests run everywhere. Small scanned models keep each compile
to seconds.
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxreplay import config as config_lib
from jaxreplay.experiments import tpu_compile as tc, tpu_cost
from jaxreplay.models import decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f"the TPU compiler is not installed: pip install 'jax[tpu]=={jax.__version__}' (libtpu) to run it")
FLOPS_TOLERANCE = 0.10  # compiled FLOPs exceed the matmul closed form by the norms, softmax, GELU and Adam


def small(**overrides):
  c = config_lib.default()
  c.model.update(d_model=128, n_layers=3, head_dim=32, seq_len=64, vocab_size=512)
  c.optim.batch_size, c.eval.batch_size, c.stop.steps = 16, 8, 10
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def finetune(c, method="kl"):
  c.stage, c.init["from"], c.replay.method, c.replay.buffer = "finetune", "/not/here", method, 2
  return c


def cli(*args, env_extra=None, prelude=""):
  """`jaxreplay compile ARGS` in a subprocess: (exit status, stderr)."""
  code = f"import sys; {prelude}from jaxreplay import cli; sys.exit(cli.main(['jaxreplay', 'compile', *sys.argv[1:]]))"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **(env_extra or {}))
  p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
  return p.returncode, p.stderr


def error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("jaxreplay: error:")]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]


def test_libtpu_missing_is_one_sentence():
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v5e:2x2", prelude="sys.modules['libtpu'] = None; ")
  assert rc == 2 and "pip install 'jax[tpu]==" in error_line(err)


def test_unknown_topology_lists_the_known():
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v9:2x2")
  line = error_line(err)
  assert rc == 2 and "v4, v5e, v5p, v6e" in line and "v5e:2x2" in line


@needs_libtpu
def test_bad_inputs_fail_before_any_compile():
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v5e:2x2", "--config.mesh.data=3")
  assert rc == 2 and "does not divide the 4 chips of v5e:2x2" in error_line(err)
  rc, err = cli("--config=sweeps/instruct.py", "--target=v5e:2x2", "--config.model.path=/no/such/model")
  assert rc == 2 and "needs the model's shape" in error_line(err)
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v5e:3x7")
  assert rc == 2 and "v5e:3x7" in error_line(err)


@needs_libtpu
def test_oversized_run_gets_one_sentence_with_the_fix():
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v5e:2x2", "--config.model.vocab_size=65536",
                "--config.optim.batch_size=2048", "--config.model.seq_len=256")
  line = error_line(err)
  assert rc == 2 and line.startswith("jaxreplay: error: The train step does not fit on v5e:2x2: it needs")
  assert "config.train.microbatches=2" in line and "config.mesh.fsdp=4" in line
  assert "remat" not in line  # the TPU's choice has it on already


@pytest.fixture(scope="module")
def v5e():
  return tc.target("v5e:2x2")


@pytest.fixture(scope="module")
def plain_report(v5e):
  return tc.compile_run(small(), v5e)


def closed_form(c, rows: int, chips: int, train: bool = True, remat: bool = False) -> float:
  """Model FLOPs per chip (decoder.flops_per_token: 6N + attention per trained token, a third of it for a forward
  pass); `remat`: with each block's forward pass once more, the most remat can add (a third of the blocks')."""
  cfg = tc.model_config(c)
  per_token = decoder.flops_per_token(cfg)
  if not train:
    return per_token / 3 * rows * cfg.seq_len / chips
  if remat:
    per_token += (per_token - 6 * cfg.d_model * cfg.vocab_size) / 3
  return per_token * rows * cfg.seq_len / chips


def check_train_flops(flops: float, c, rows: int, chips: int):
  """Between the model's FLOPs and remat's most, within the tolerance (norms, softmax, GELU, Adam)."""
  assert closed_form(c, rows, chips) <= flops <= (1 + FLOPS_TOLERANCE) * closed_form(c, rows, chips, remat=True)


@needs_libtpu
def test_plain_train_and_eval_flops_per_chip_equal_the_closed_form(plain_report):
  c, r = small(), plain_report
  assert set(r) == {"init", "train_step", "eval_step"} and all(p["fits"] for p in r.values())
  assert tc.model_config(c).remat  # the TPU's choice
  check_train_flops(r["train_step"]["flops"], c, 16, 4)
  ratio = r["eval_step"]["flops"] / closed_form(c, 8, 4, train=False)
  assert 1.0 <= ratio <= 1 + FLOPS_TOLERANCE
  assert 0 < r["train_step"]["mfu"] < 1 and r["train_step"]["roofline_s"] > 0


@needs_libtpu
def test_counted_trips_equal_the_unrolled_program(v5e, monkeypatch):
  """Without remat (which XLA merges away once layers are unrolled), the cost counted from the loop's variants
  equals the same step with every layer unrolled, a program without loops; the scanned program's own count is
  far below it (its body once)."""
  model_config = tc.model_config
  monkeypatch.setattr(tc, "model_config", lambda c, platform="tpu": dataclasses.replace(model_config(c, platform),
                                                                                        remat=False))
  counted = tc.compile_run(small(), v5e)["train_step"]["flops"]
  c = small()
  c.model.scan_unroll = 3
  mesh = tc.make_mesh(c, v5e)
  unrolled = tpu_cost.costs(tc.compile_program(tc.programs(c, mesh)["train_step"])[0])["flops"]
  assert counted == pytest.approx(unrolled, rel=0.03)
  scanned = tpu_cost.costs(tc.compile_program(tc.programs(small(), mesh)["train_step"])[0])["flops"]
  assert scanned < 0.6 * unrolled
  check_train_flops(counted, small(), 16, 4)


@needs_libtpu
def test_memory_grows_with_batch_as_the_closed_form_says(v5e):
  """Arguments: the replicated state (params + 2 Adam moments, fp32, and the step) plus this chip's int32 rows,
  within the compiler's tile padding; outputs: the new state, aliased to the donated one. Temporaries do not
  shrink with more rows (at this size XLA's TPU compiler keeps them nearly flat: no linear law holds there)."""
  hbm = {}
  for B in (16, 32, 64):
    c = small(optim__batch_size=B)
    mesh = tc.make_mesh(c, v5e)
    prog = tc.programs(c, mesh)["train_step"]
    hbm[B] = tc.hbm_bytes(tc.compile_program(prog)[0])
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(prog.args[0]))
    assert 1 <= hbm[B]["arguments"] / (state_bytes + B // 4 * 64 * 4) < 1.01
    assert 1 <= hbm[B]["aliases"] / state_bytes < 1.01
  args = [hbm[B]["arguments"] for B in (16, 32, 64)]
  assert args[2] - args[1] == 2 * (args[1] - args[0])  # linear in the rows, exactly
  assert hbm[64]["temporaries"] >= 0.95 * hbm[16]["temporaries"]


@needs_libtpu
def test_kl_finetune_with_microbatches_on_a_multi_host_slice():
  tgt = tc.target("v5e:4x4")
  assert tgt.chips == 16 and tgt.hosts == 4
  c = finetune(small(optim__batch_size=32, train__microbatches=2))
  r = tc.compile_run(c, tgt)
  assert {"train_step", "eval_step", "sampler", "prefill", "decode_step"} <= set(r)
  assert all(p["fits"] for p in r.values())
  # kl trains on B downstream + B replay rows; the teacher's logits were kept from sampling (no frozen forward)
  assert config_lib.replay_teacher(c, 16) == "sampled"
  check_train_flops(r["train_step"]["flops"], c, 64, 16)
  # the sampler: 64 rows, prefill + 62 decode steps, each a forward pass of one token per row
  assert r["sampler"]["flops"] >= closed_form(c, 64, 16, train=False) * 62 / 64


@needs_libtpu
def test_v4_and_v5p_give_one_device_per_chip():
  for name in ("v4:2x2x1", "v5p:2x2x1"):
    tgt = tc.target(name)
    assert tgt.chips == 4 and {d.core_on_chip for d in tgt.devices} == {0}
  from jax.experimental import topologies
  cores = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices  # 2 per chip
  mesh = tc.sharding.make_mesh(config_lib.default().mesh, cores)
  assert mesh.shape["data"] == 8


@needs_libtpu
def test_the_cli_prints_the_table_and_writes_json(tmp_path):
  out = tmp_path / "r.json"
  rc, err = cli("--config=sweeps/quickstart.py:pretrain", "--target=v6e:2x2", "--config.model.n_layers=2",
                "--config.optim.batch_size=8", "--config.eval.batch_size=8", f"--json={out}")
  assert rc == 0, err[-2000:]
  import json
  report = json.loads(out.read_text())
  assert report["chips"] == 4 and report["chip"]["name"] == "v6e"
  assert report["programs"]["train_step"]["fits"] and report["programs"]["train_step"]["mfu"] > 0


def test_summary_is_the_roofline_of_the_stated_figures():
  chip = tc.CHIPS["v5e"]
  s = tpu_cost.summary(chip, {"flops": 197e12, "bytes accessed": 819e9 / 2}, tokens=1000, model_flops=4 * 98.5e12,
                       chips=4)
  assert s["roofline_s"] == pytest.approx(1.0) and s["bound"] == "compute"
  assert s["tokens_per_s"] == pytest.approx(1000) and s["mfu"] == pytest.approx(0.5)
  assert dataclasses.asdict(chip)["hbm_bandwidth"] == 819e9


def test_extrapolation_is_bilinear():
  f = {(l, k): {"flops": 10 + 3 * l + k * (5 + 7 * l), "bytes accessed": 1.0} for l in (1, 2) for k in (1, 2)}
  assert tpu_cost.extrapolate(f, 16, 4)["flops"] == 10 + 3 * 16 + 4 * (5 + 7 * 16)


@needs_libtpu
def test_a_sweep_compiles_each_distinct_program_once_and_names_the_runs_that_do_not_fit(v5e):
  from jaxreplay.experiments import sweeps, tpu_sweep
  s = sweeps.Sweep("two learning rates share a program; a huge batch does not fit")
  # one layer: the real programs' own counts are their costs, so no variant compiles
  s.stage("pre", small(model__n_layers=1), [{"optim.lr": 1e-3}, {"optim.lr": 3e-3},
                           {"optim.batch_size": 4096, "model.vocab_size": 65536, "model.seq_len": 256}])
  compiled = []
  result = tpu_sweep.compile_sweep(s, v5e, log=compiled.append)
  assert len(compiled) == 2 and result["runs"] == 3
  (program,), (too_big,) = result["programs"], result["too_big"]
  assert len(program["runs"]) == 2 and program["chip_hours"] > 0 and result["chip_hours"] == program["chip_hours"]
  assert len(too_big["runs"]) == 1 and "does not fit on v5e:2x2" in too_big["error"]
  with pytest.raises(tc.DoesNotFit, match=re.escape(f"Runs {too_big['runs'][0]} do not fit: the train step")):
    tpu_sweep.check_fits(result)


def tiny_sweep_file(path, big: bool = False) -> str:
  """A sweep file of two 1-layer runs that share one program (two learning rates), or, with `big`, of one run
  whose train step needs ~100 GB per chip."""
  path.write_text(textwrap.dedent(f"""
      from jaxreplay import config
      from jaxreplay.experiments import sweeps

      def get_sweep(arg=""):
        c = config.default()
        c.model.update(d_model=128, n_layers=1, head_dim=32, seq_len=64, vocab_size=512)
        c.optim.batch_size, c.eval.batch_size, c.stop.steps = 16, 8, 10
        s = sweeps.Sweep("tiny")
        grid = [{{"optim.batch_size": 4096, "model.vocab_size": 65536, "model.seq_len": 256}}] if {big} else \\
            [{{"optim.lr": 1e-3}}, {{"optim.lr": 3e-3}}]
        s.stage("pre", c, grid)
        return s
      """))
  return str(path)


def sweep_cli(*args):
  """`jaxreplay sweep ARGS` in a subprocess: (exit status, stdout, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", *args], capture_output=True, text=True, env=env,
                     cwd=ROOT)
  return p.returncode, p.stdout, p.stderr


def test_sweep_target_needs_dry_run_and_a_known_topology(tmp_path):
  spec = tiny_sweep_file(tmp_path / "s.py")
  rc, _, err = sweep_cli(spec, "--target=v5e:2x2", f"--workdir={tmp_path / 'w'}")
  assert rc == 2 and "add --dry-run" in error_line(err) and not (tmp_path / "w").exists()
  rc, _, err = sweep_cli(spec, "--dry-run", "--target=v9:2x2")
  assert rc == 2 and "v4, v5e, v5p, v6e" in error_line(err)


@needs_libtpu
def test_sweep_dry_run_target_prices_a_fitting_sweep_and_refuses_one_that_does_not_fit(tmp_path):
  rc, out, err = sweep_cli(tiny_sweep_file(tmp_path / "s.py"), "--dry-run", "--target=v5e:2x2")
  assert rc == 0, err[-2000:]
  assert err.count("compiling the program of 2 run(s)") == 1  # two runs, one program, one compile
  assert "1 distinct programs for 2 runs" in out and "fits         2 runs" in out
  # the assumed-MFU figure at the chip's peak, beside the roofline chip-hours
  assert "device-hours at 197 TFLOP/s peak and 40% MFU" in out
  priced = float(re.search(r"^= ([\d.e+-]+) chip-hours", out, re.M).group(1))
  per_program = float(re.search(r"GB/chip, train step .* ([\d.e+-]+) chip-hours$", out, re.M).group(1))
  assert priced == pytest.approx(per_program, rel=0.01) and priced > 0
  rc, out, err = sweep_cli(tiny_sweep_file(tmp_path / "big.py", big=True), "--dry-run", "--target=v5e:2x2",
                           f"--workdir={tmp_path / 'w'}")
  line = error_line(err)
  assert rc == 2 and line.startswith("jaxreplay: error: Runs pre/") and "do not fit: the train step" in line
  assert "TOO BIG" in out and not (tmp_path / "w").exists()  # a dry run writes nothing
