"""The one entrance (experiments/resolve.run_config), through the real CLI in a subprocess: an experiment file
imports helpers next to it, `default:` data resolves under every key that names token data (and a missing
directory names its own key), and `--cache_dir` reaches a sweep's workers."""

import json
import os
import subprocess
import sys
import textwrap

from jaxreplay.data.tokenizer import tokenizer_hash

from helpers import token_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def default_cache(root, vocab=VOCAB, **sizes) -> str:
  """A data cache holding default:en:VOCAB and default:es:VOCAB, as `jaxreplay data default` leaves it (tiny
  stand-ins: the tokenizer file's hash is what the cache check reads)."""
  bible = root / f"bible_v{vocab}"
  bible.mkdir(parents=True)
  (bible / "tokenizer.json").write_text(json.dumps({"model": {"type": "stand-in"}}))
  for dataset_id, lang in enumerate(("en", "es")):
    token_dir(bible / lang, vocab_size=vocab, dataset_id=dataset_id, seed=dataset_id, **sizes)
    meta = json.loads((bible / lang / "meta.json").read_text())
    meta["tokenizer_hash"] = tokenizer_hash(str(bible / "tokenizer.json"))
    (bible / lang / "meta.json").write_text(json.dumps(meta))
  return str(root)


def experiment(path) -> str:
  path.write_text(textwrap.dedent(f"""
      from jaxreplay import config as config_lib
      def get_config(arg="pretrain"):
        c = config_lib.default()
        c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size={VOCAB})
        c.data.path = "default:en:{VOCAB}" if arg == "pretrain" else "default:es:{VOCAB}"
        c.stage = arg
        c.optim.update(batch_size=8, warmup_tokens=0)
        c.eval.update(every_tokens=10_000, tokens=256, batch_size=8)
        c.checkpoint.async_save = False
        c.log.progress = False
        c.stop.steps = 2
        return c
      def get_sweep(arg=""):
        from jaxreplay.experiments import sweeps
        s = sweeps.Sweep("one pretraining run on default data")
        s.stage("pretrain", get_config())
        return s
      """))
  return str(path)


def jaxreplay(args, cwd, home):
  """`jaxreplay ARGS` with a HOME whose default cache cannot be written: default data must come from --cache_dir."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             HOME=str(home), XDG_CACHE_HOME="")
  env.pop("JAXREPLAY_CACHE", None)
  return subprocess.run([sys.executable, "-m", "jaxreplay.cli", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)


def test_default_data_resolves_under_every_key_and_cache_dir_reaches_sweeps(tmp_path):
  cache, exp = default_cache(tmp_path / "cache"), experiment(tmp_path / "exp.py")
  home = tmp_path / "file"
  home.write_text("a HOME under which nothing can be created")
  r = jaxreplay(["sweep", exp, f"--workdir={tmp_path / 'sweep'}", f"--cache_dir={cache}"], tmp_path, home)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  pre = tmp_path / "sweep" / "runs" / "pretrain"
  assert json.loads((pre / "config.json").read_text())["data"]["path"] == os.path.join(cache, "bible_v64", "en")
  ft = ["finetune", f"--config={exp}:finetune", f"--config.init.from={pre}", "--config.replay.method=ntp",
        "--config.replay.source=real", f"--cache_dir={cache}"]
  r = jaxreplay(ft + [f"--config.replay.path=default:en:{VOCAB}", f"--workdir={tmp_path / 'ft'}"], tmp_path, home)
  assert r.returncode == 0, r.stderr[-2000:]
  data = json.loads((tmp_path / "ft" / "config.json").read_text())
  assert data["replay"]["path"] == os.path.join(cache, "bible_v64", "en")
  assert data["data"]["path"] == os.path.join(cache, "bible_v64", "es")
  r = jaxreplay(ft + [f"--config.replay.path={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'bad'}"], tmp_path,
                home)
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
  assert f"{tmp_path / 'nowhere'} does not exist" in r.stderr and "fix config.replay.path" in r.stderr


def test_an_experiment_file_imports_the_helpers_next_to_it(tmp_path):
  """sweeps/instruct.py:small imports _tiny_llama from its own folder, from any working directory; the file
  loads, and the bad override given on it is what the one error line names."""
  for command in ("instruct", "finetune"):
    r = jaxreplay([command, f"--config={os.path.join(ROOT, 'sweeps', 'instruct.py')}:small",
                   "--config.optim.lr=-1", f"--workdir={tmp_path / command}"], tmp_path, tmp_path)
    assert r.returncode == 2 and "config.optim.lr=-1.0 is invalid" in r.stderr, r.stderr[-2000:]
