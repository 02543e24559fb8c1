"""Every kind of bad input each subcommand can get, through the real CLI in a subprocess: exit status 2, one
line on stderr, no traceback. The cases of one subcommand run at once, to keep CI short."""

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import token_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Experiment files (good, broken, raising on a bad argument), a token dir, and a regular file whose
  children cannot exist: a path that cannot be written, also for root (who ignores permissions)."""
  d = tmp_path_factory.mktemp("cli")
  data = token_dir(d / "data")
  (d / "exp.py").write_text(textwrap.dedent(f"""
      from jaxreplay import config as config_lib
      def get_config(arg="pretrain"):
        if arg not in ("pretrain", "finetune"):
          raise ValueError(f"unknown config {{arg!r}}: use pretrain or finetune")
        c = config_lib.default()
        c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64)
        c.data.path = {data!r}
        c.optim.update(batch_size=8, warmup_tokens=0)
        c.eval.update(every_tokens=10_000, tokens=256, batch_size=8)
        c.log.progress = False
        c.stop.steps = 2
        return c
      def get_sweep(arg=""):
        raise TypeError("get_sweep is broken")
      """))
  (d / "broken.py").write_text("def get_config(:\n")
  (d / "file").write_text("not a directory")
  return dict(dir=str(d), exp=str(d / "exp.py"), broken=str(d / "broken.py"), data=data,
              blocked=str(d / "file" / "sub"), text=str(d / "exp.py"))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  env.pop("JAXREPLAY_CACHE", None)
  env.update(extra)
  return env


def check_all(cases, cwd):
  """cases: (argv after `jaxreplay`, a substring the one error line must hold, extra environment)."""
  procs = [(args, want, subprocess.Popen([sys.executable, "-m", "jaxreplay.cli", *args], cwd=cwd,
                                         env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
           for args, want, env in cases]
  failures = []
  for args, want, p in procs:
    out, err = p.communicate(timeout=300)
    lines = err.strip().splitlines()
    if p.returncode != 2 or len(lines) != 1 or "Traceback" in err or want not in err:
      failures.append(f"jaxreplay {' '.join(args)}: rc={p.returncode}, stderr={err[-1500:]!r}")
  assert not failures, "\n".join(failures)


def test_pretrain_and_finetune_bad_inputs(files, tmp_path):
  exp, w = files["exp"], str(tmp_path / "w")
  home_blocked = dict(HOME=files["blocked"], XDG_CACHE_HOME="")
  check_all([
      (["pretrain"], "--workdir is required", {}),
      (["pretrain", f"--workdir={w}"], "--config is required", {}),
      (["pretrain", f"--config={exp}", f"--wrkdir={w}"], "unrecognized arguments: --wrkdir=", {}),
      (["pretrain", f"--config={exp}", "--workdir"], "argument --workdir: expected one argument", {}),
      (["pretrain", f"--config={exp}", f"--workdir={w}", "extra"], "unrecognized arguments: extra", {}),
      (["pretrain", "--config=missing.py", f"--workdir={w}"], "'missing.py' does not exist", {}),
      (["pretrain", f"--config={exp}:bogus", f"--workdir={w}"], "unknown config 'bogus'", {}),
      (["pretrain", f"--config={files['broken']}", f"--workdir={w}"], "SyntaxError", {}),
      (["pretrain", f"--config={exp}", "--config.model.d_modl=64", f"--workdir={w}"],
       "did you mean --config.model.d_model?", {}),
      (["pretrain", f"--config={exp}", "--config.zzz=1", f"--workdir={w}"], "config has checkpoint, data", {}),
      (["pretrain", f"--config={exp}", "--config.model.d_model=abc", f"--workdir={w}"], "'abc' is not an int", {}),
      (["pretrain", f"--config={exp}", "--config.log.progress=maybe", f"--workdir={w}"], "is not a bool", {}),
      (["pretrain", f"--config={exp}", "--config.optim.lr=-1", f"--workdir={w}"], "config.optim.lr=-1.0", {}),
      (["pretrain", f"--config={exp}", "--config.optim.lr=0.1", "--config.optim.lr", "0.2", f"--workdir={w}"],
       "--config.optim.lr is given twice, as '0.1' and '0.2'", {}),
      (["pretrain", f"--config={exp}", "--config.data.path=/nonexistent", f"--workdir={w}"],
       "/nonexistent does not exist", {}),
      (["pretrain", f"--config={exp}", f"--workdir={files['blocked']}"], "choose another --workdir", {}),
      (["pretrain", f"--config={exp}", "--config.data.path=default:en", f"--workdir={w}"],
       "cannot be written", home_blocked),
      (["finetune", f"--config={exp}:finetune", f"--workdir={w}"], "needs config.init.from", {}),
      (["finetune", f"--config={exp}:finetune", "--config.init.from=/nonexistent", f"--workdir={w}"],
       "/nonexistent", {}),
  ], files["dir"])


def test_data_bad_inputs(files, tmp_path):
  text, tok = files["text"], str(tmp_path / "tok.json")
  check_all([
      (["data"], "required: command", {}),
      (["data", "bogus"], "invalid choice: 'bogus'", {}),
      (["data", "tokenizer", text], "required: --out", {}),
      (["data", "tokenizer", "--out", tok, "--vocab_size=abc", text], "invalid int value: 'abc'", {}),
      (["data", "tokenizer", "--out", tok, "missing.txt"], "neither a file nor a corpus name", {}),
      (["data", "tokenizer", "--out", os.path.join(files["blocked"], "tok.json"), "--vocab_size=300", text],
       "choose a path that exists", {}),
      (["data", "tokenize", "--tokenizer", "missing.json", "--out", str(tmp_path / "o"), "--dataset_id=1", text],
       "does not exist", {}),
      (["data", "tokenize", "--tokenizer", tok, "--out", str(tmp_path / "o"), "--dataset_id=12", text],
       "dataset_id=12", {}),
      (["data", "default", f"--cache_dir={files['blocked']}"], "cannot be written", {}),
      (["data", "default"], "cannot be written", dict(HOME=files["blocked"], XDG_CACHE_HOME="")),
  ], files["dir"])


def test_sweep_report_quickstart_instruct_bad_inputs(files, tmp_path):
  exp, w = files["exp"], str(tmp_path / "w")
  check_all([
      (["bogus"], "unknown command 'bogus'", {}),
      (["sweep"], "required: spec", {}),
      (["sweep", os.path.join(ROOT, "sweeps", "quickstart.py")], "--workdir is required", {}),
      (["sweep", "missing.py", f"--workdir={w}"], "'missing.py' does not exist", {}),
      (["sweep", files["text"] + "x", "--workdir", w], "does not exist", {}),
      (["sweep", files["broken"], f"--workdir={w}"], "SyntaxError", {}),
      (["sweep", exp, f"--workdir={w}"], "get_sweep is broken", {}),
      (["sweep", os.path.join(ROOT, "sweeps", "quickstart.py"), f"--workdir={w}", "--status"],
       f"--workdir={w} does not exist", {}),
      (["sweep", os.path.join(ROOT, "sweeps", "quickstart.py:bogus"), f"--workdir={w}"],
       "has no variant 'bogus'", {}),
      (["sweep", os.path.join(ROOT, "sweeps", "quickstart.py"), f"--workdir={w}", "--jobs=abc"],
       "invalid int value: 'abc'", {}),
      (["report"], "required: paths", {}),
      (["report", "/nonexistent"], "holds no results.sqlite", {}),
      (["quickstart", "--scale=abc"], "invalid float value: 'abc'", {}),
      (["quickstart", "--bogus"], "unrecognized arguments: --bogus", {}),
      (["quickstart", "--scale=-1"], "--scale=-1.0 must be > 0", {}),
      (["quickstart", "--config=missing.py"], "'missing.py' does not exist", {}),
      (["quickstart", f"--workdir={w}", f"--cache_dir={files['blocked']}"], "cannot be written", {}),
      (["instruct"], "--workdir is required", {}),  # finetune with sweeps/instruct.py
      (["instruct", "--config=missing.py", f"--workdir={w}"], "'missing.py' does not exist", {}),
      (["instruct", f"--config={files['broken']}", f"--workdir={w}"], "SyntaxError", {}),
      (["instruct", f"--config={exp}", "--config.optim.lrr=1", f"--workdir={w}"], "did you mean --config.optim.lr?",
       {}),
      (["instruct", f"--config={exp}", "--config.optim.lr=fast", f"--workdir={w}"], "'fast' is not a float", {}),
  ], files["dir"])
