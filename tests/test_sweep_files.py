"""Every variant of every sweep file in sweeps/ expands and validates, without training or compiling anything.

For each finetuning run the model shape is its parent's; the paper-scale grids resolve their tokens per
parameter to the paper's token counts; --dry-run prices a run by the closed form.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jaxreplay.errors import SweepError
from jaxreplay import config as config_lib
from jaxreplay.experiments import sweepcost
from jaxreplay.experiments import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_DIR = os.path.join(ROOT, "sweeps")
FILES = sorted(f for f in os.listdir(SWEEP_DIR) if f.endswith(".py") and not f.startswith("_"))


def _variant_args():
  out = []
  for f in FILES:
    for v in sweeps.variants(os.path.join(SWEEP_DIR, f)):
      out.append((f, v.replace("N", "1")))  # a family such as seed=N, tried with N=1
  return out


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # toy and instruct variants write their data under the working directory
  return tmp_path


def test_every_sweep_file_lists_its_variants():
  for f in FILES:
    declared = sweeps.variants(os.path.join(SWEEP_DIR, f))
    assert declared and all(isinstance(v, str) and v for v in declared.values()), f


def test_a_file_without_variants_cannot_be_listed(tmp_path):
  path = tmp_path / "bare.py"
  path.write_text("def get_sweep(arg=''):\n  pass\n")
  with pytest.raises(SweepError, match="declares no VARIANTS"):
    sweeps.variants(str(path))


def test_load_runs_the_sweep_file_once(tmp_path):
  path = tmp_path / "counted.py"
  path.write_text("open(__file__ + '.n', 'a').write('x')\nfrom jaxreplay.experiments import sweeps\n"
                  "VARIANTS = {'': 'one'}\ndef get_sweep(arg=''):\n  return sweeps.Sweep()\n")
  sweeps.load(str(path))
  assert (tmp_path / "counted.py.n").read_text() == "x"


@pytest.mark.parametrize("file, variant", _variant_args())
def test_every_variant_expands_validates_and_children_keep_the_parents_shape(file, variant, in_tmp):
  runs = sweeps.expand(sweeps.load(os.path.join(SWEEP_DIR, file) + (f":{variant}" if variant else "")))
  assert runs and len({r.name for r in runs}) == len(runs)
  by_name = {r.name: r for r in runs}
  for r in runs:
    if r.parent is None:
      continue
    parent = by_name[r.parent].config["model"]
    for key in config_lib.weight_model_keys(parent):
      assert r.config["model"][key] == parent[key], (r.name, key)
  if variant == "small":
    # tiny paper models; a Hugging Face run's shape comes from its (tiny) checkpoint, not model.d_model
    assert all(r.config["model"].get("path") or r.config["model"].get("d_model", 0) <= 64 for r in runs)


# The paper's token counts: TPP × the paper's parameter count 12·L·D² + D·V (V=4096), written out here.
PAPER_TOKENS = {
    ("grid_2d.py", "pretrain/d=256,tpp=20"): 20 * 5_767_168,
    ("grid_2d.py", "pretrain/d=448,tpp=160"): 160 * (12 * 6 * 448 ** 2 + 448 * 4096),
    ("grid_2d.py", "pretrain/d=640,tpp=1280"): 1280 * 32_112_640,
    ("pretrain_length.py", "pretrain/tpp=10"): 57_671_680,
    ("pretrain_length.py", "pretrain/tpp=10000"): 10_000 * 5_767_168,
    ("capacity.py", "pretrain/mix=0.007812"): 17_000 * 5_767_168,  # ≈ 98B: 10 epochs of a ~10B-token file
    ("capacity.py", "pretrain_chinchilla"): 20 * 5_767_168,
    ("batch_size_b2.py", "pretrain/bs=4,b2=0.999"): 20 * 5_767_168,
    ("high_lr.py", "pretrain"): 1000 * 5_767_168,
}


def test_paper_scale_pretraining_resolves_to_the_papers_token_counts():
  costs = {}
  for (file, name), tokens in PAPER_TOKENS.items():
    if file not in costs:
      costs[file] = {r.name: sweepcost.run_cost(r) for r in sweeps.expand(sweeps.load(os.path.join(SWEEP_DIR, file)))}
    c = costs[file][name]
    tokens_per_step = c.tokens // c.steps  # batch × 256 tokens
    assert abs(c.tokens - tokens) <= tokens_per_step / 2, (file, name, c.tokens, tokens)
    assert c.steps == round(tokens / tokens_per_step)
  # every grid_2d finetuning run has its parent's shape: D in the name, D in the config
  for name, c in costs["grid_2d.py"].items():
    if name.startswith("finetune/"):
      width = re.search(r"d=(\d+)", name).group(1)
      assert f"D={width} L=6" in c.shape, name


def test_flops_of_one_run_match_the_closed_form():
  runs = {r.name: r for r in sweeps.expand(sweeps.load(os.path.join(SWEEP_DIR, "grid_2d.py")))}
  pre = sweepcost.run_cost(runs["pretrain/d=640,tpp=1280"])
  L, D, V, T = 6, 640, 4096, 256
  N = 12 * L * D * D + D * V  # the paper's convention (32,112,640)
  tokens = 1280 * N
  # 6·N per token (forward + backward of every matmul weight, unembedding included) + 12·L·T·D attention
  assert pre.flops == pytest.approx(tokens * (6 * N + 12 * L * T * D), rel=1e-12)
  assert pre.params == N and pre.tokens == tokens
  ft = runs["finetune/pretrain/d=640,tpp=1280/method=kl,src=real,coeff=10"]
  B = 256  # KL on real rows: 256 replay rows (fwd + bwd) and a frozen forward (a third) on them, per step
  assert sweepcost.flops_per_step(ft.config) == pytest.approx((6 * N + 12 * L * T * D) * T * (B + B + B / 3))


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", "sweep", *args], capture_output=True, text=True,
                        cwd=cwd, timeout=300)


def test_dry_run_lists_and_prices_the_2d_grid(tmp_path):
  r = _cli(os.path.join(SWEEP_DIR, "grid_2d.py"), f"--workdir={tmp_path / 'w'}", "--dry-run", "--peak_tflops=100",
           "--mfu=0.5")
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "507 runs in dependency order (169 pretrain, 338 finetune)" in out
  line = next(l for l in out.splitlines() if l.startswith("pretrain/d=640,tpp=1280 "))
  assert "D=640 L=6 H=20 V=4096 T=256" in line and "41.1G" in line and "627200" in line
  child = next(l for l in out.splitlines() if l.startswith("finetune/pretrain/d=640,tpp=1280/method=none"))
  assert "D=640" in child and child.rstrip().endswith("pretrain/d=640,tpp=1280")
  total = float(re.search(r"total training compute: (\S+) FLOPs", out).group(1))
  hours = float(re.search(r"= ([\d,.]+) device-hours", out).group(1).replace(",", ""))
  assert hours == pytest.approx(total / (100e12 * 0.5) / 3600, rel=1e-3)
  assert not os.path.exists(tmp_path / "w")  # a dry run writes nothing


def test_variants_flag_and_help_list_the_variants(tmp_path):
  r = _cli(os.path.join(SWEEP_DIR, "repro_tpp.py"), "--variants")
  assert r.returncode == 0 and ":seed=N" in r.stdout and "(none)" in r.stdout
  r = _cli(os.path.join(SWEEP_DIR, "grid_2d.py"), "--help")
  assert r.returncode == 0 and ":small" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["grid_2d.py:tiny"], r"has no variant 'tiny': use one of '' \(no argument\), 'paper', 'small'"),
    (["repro_tpp.py:seed=x"], r"has no variant 'seed=x'"),
    (["grid_2d.py:small", "--only=nothing_like_this"], r"--only='nothing_like_this' matches no run"),
])
def test_bad_input_is_one_error_before_anything_runs(args, message, tmp_path):
  args = [os.path.join(SWEEP_DIR, args[0])] + args[1:]
  r = _cli(*args, f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "w" / "runs")


def test_a_child_that_sets_another_shape_than_its_parent_fails_at_expansion(tmp_path):
  path = tmp_path / "bad_grid.py"
  path.write_text(
      "from jaxreplay import config\nfrom jaxreplay.experiments import sweeps\n"
      "VARIANTS = {'': 'a bad grid'}\n"
      "def get_sweep(arg=''):\n"
      "  c = config.default(); c.data.path = 'x'; c.stop.steps = 1\n"
      "  s = sweeps.Sweep()\n"
      "  s.stage('pretrain', c, {'model.d_model': [128, 256]})\n"
      "  f = config.default(); f.data.path = 'y'; f.stop.steps = 1\n"
      "  s.stage('finetune', f, {'model.d_model': [128]}, after='pretrain')\n"
      "  return s\n")
  r = _cli(str(path), f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert r.returncode == 2 and not os.path.exists(tmp_path / "w" / "runs")
  assert ("Run 'finetune/pretrain/d=256/d=128': config.model.d_model=128 differs from the run in init.from (256): "
          "finetuning keeps the pretrained model's shape") in r.stderr, r.stderr
  # the width the base config says is replaced by the parent's when the child does not set it
  s = sweeps.load(str(path))
  s.stages[1].grid = [{}]
  runs = {r.name: r for r in sweeps.expand(s)}
  assert runs["finetune/pretrain/d=256"].config["model"]["d_model"] == 256


def test_dry_run_states_the_packs_idle_share(tmp_path):
  """Runs of 100, 80 and 10 steps, one shape: 100 and 80 pack (20 idle member-steps of 200 = 10%); the 10-step
  run would make it (20 + 90) / 300 = 37% > 25%, so it trains alone."""
  spec = tmp_path / "s.py"
  spec.write_text(textwrap.dedent("""
      from jaxreplay import config
      from jaxreplay.experiments import sweeps

      def get_sweep(arg=""):
        c = config.default()
        c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
        c.data.path = "data/none"
        s = sweeps.Sweep("", pack=16)
        s.stage("pretrain", c, {"stop.steps": [100, 80, 10]})
        return s
      """))
  r = _cli(str(spec), f"--workdir={tmp_path / 'w'}", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert ("--pack: 2 runs in 1 packs (sizes 2), 1 runs chained, 2 processes in all; members idle after their "
          "stop: 10% of the packs' member-steps (at most 25% a pack)") in r.stdout
