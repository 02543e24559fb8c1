"""`jaxreplay SUBCOMMAND ...`: thin wrappers over the library.

  jaxreplay pretrain --config=sweeps/quickstart.py:pretrain --config.model.d_model=256 --workdir=DIR
  jaxreplay finetune --config=sweeps/quickstart.py:finetune --config.init.from=DIR --workdir=DIR2
  jaxreplay data default|tokenizer|tokenize ...
  jaxreplay quickstart --workdir=runs/quickstart

Errors a user can cause end in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

USAGE = """usage: jaxreplay COMMAND [flags]

commands:
  pretrain     train a model from scratch:  --config=FILE.py[:ARG] [--config.KEY=VALUE ...] --workdir=DIR
  finetune     train from a finished run:   same flags; --config.init.from=PRETRAIN_WORKDIR
  data         make tokenizers and token files (jaxreplay data --help)
  sweep        run a grid of runs (jaxreplay sweep --help)
  report       tables and plots from a results table
  quickstart   pretrain on English, finetune on Spanish with and without self-generated replay
  eval         lm-evaluation-harness tasks on a run: --workdir=RUN --tasks=a,b [--limit=N] (jaxreplay eval --help)
  instruct     finetune with --config=sweeps/instruct.py[:ARG] (a Hugging Face Llama/Qwen on chat data with
               BOS-prompted replay); a grid of them: jaxreplay sweep sweeps/instruct.py[:small] --workdir=DIR
"""

COMMANDS = ("pretrain", "finetune", "data", "sweep", "report", "quickstart", "instruct", "eval")


def _user_errors():
  from jaxreplay.config import ConfigError
  from jaxreplay.train.checkpoint import CheckpointError
  from jaxreplay.data.errors import DataError
  from jaxreplay.sharding import MeshError
  from jaxreplay.train.loop import TrainingError
  from jaxreplay.data.chat import ChatDataError
  from jaxreplay.models.hf_import import ImportError_
  from jaxreplay.evals.mcq import MCQError
  return (ConfigError, CheckpointError, DataError, MeshError, TrainingError, ChatDataError, ImportError_, MCQError)


def _fail(message: str):
  print(f"jaxreplay: error: {message}", file=sys.stderr)
  sys.exit(2)


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return " ".join(lines[:2]) if lines else type(e).__name__


@contextlib.contextmanager
def _one_line_usage_errors(command: str):
  """argparse prints its whole usage before a bad flag's message; a user needs the one line that says what
  is wrong. Every subcommand parses with argparse, so this covers them all for the length of one command."""
  def error(parser, message):
    _fail(f"{message} (see `jaxreplay {command} --help`).")
  saved = argparse.ArgumentParser.error
  argparse.ArgumentParser.error = error
  try:
    yield
  finally:
    argparse.ArgumentParser.error = saved


def _take_init_from(argv: list[str]) -> tuple[list[str], str | None]:
  """Pulls out --config.init.from: `from` is a Python keyword, which ml_collections' path parser rejects."""
  rest, value = [], None
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config.init.from="):
      value = arg.split("=", 1)[1]
    elif arg == "--config.init.from":
      value = next(it, "")
    else:
      rest.append(arg)
  return rest, value


def _train_main(stage: str, init_from: str | None):
  flags.DEFINE_string("workdir", None, "Directory for this run's checkpoints, metrics and exported weights.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")
  flags.DEFINE_string("cache_dir", None, "Where default:LANG data is built (default: $JAXREPLAY_CACHE, "
                      "$XDG_CACHE_HOME/jaxreplay or ~/.cache/jaxreplay).")
  config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. sweeps/quickstart.py:pretrain.",
                                  lock_config=True)

  def main(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments {argv[1:]}: pass settings as --config.KEY=VALUE.")
    FLAGS = flags.FLAGS
    if FLAGS.workdir is None:
      _fail("--workdir is required: name the directory this run writes to.")
    if FLAGS.config is None:
      _fail("--config is required, e.g. --config=sweeps/quickstart.py:pretrain.")
    if FLAGS.multihost:
      import jax
      jax.distributed.initialize()  # coordinator and process ids come from the TPU / cluster environment
    c = FLAGS.config
    c.stage = stage
    if init_from is not None:
      c.init["from"] = init_from
    from jaxreplay.config import ConfigError, validate
    try:
      validate(c)  # a bad value fails at once, before the default data is built or jax starts
    except ConfigError as e:
      _fail(str(e))
    from jaxreplay.train import loop as train
    from jaxreplay.data import resolve_path
    try:
      if init_from:  # the model shape is the parent's; a --config.model.X that contradicts it is an error
        explicit = [a[len("--config.model."):].split("=")[0] for a in sys.argv if a.startswith("--config.model.")]
        train.inherit_parent_shape(c, init_from, explicit)
      if c.data.kind == "tokens":  # chat data: JSON-lines files, read as given
        c.data.path = resolve_path(c.data.path, FLAGS.cache_dir)
      if c.data.mix_path:
        c.data.mix_path = resolve_path(c.data.mix_path, FLAGS.cache_dir)
      result = train.run(c, FLAGS.workdir)
    except _user_errors() as e:
      _fail(str(e))
    print({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

  return main


def _config_value(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config":
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def _load_experiment(value: str):
  """The config an experiment file FILE.py[:ARG] makes, or one sentence saying why it cannot be loaded.
  config_flags loads it again itself; loading it here first keeps its errors out of absl's trace dump."""
  path, _, arg = value.partition(":")
  if not path.endswith(".py") or not os.path.isfile(path):
    _fail(f"--config file {path!r} does not exist: give the path to an experiment file in sweeps/, "
          "e.g. --config=sweeps/quickstart.py:pretrain.")
  try:
    spec = importlib.util.spec_from_file_location("jaxreplay_cli_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # the user's own file: any failure in it is theirs to fix, said in one line
    _fail(f"--config={value} could not be loaded ({type(e).__name__}: {_first_line(e)}): fix the experiment "
          "file or its argument.")


def _check_overrides(argv: list[str]):
  """Every --config.KEY=VALUE must name an existing setting (a misspelled one gets a 'did you mean') and
  give a value of its type."""
  value = _config_value(argv)
  if value is None:
    return
  c = _load_experiment(value)
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith("--config.init.from"):
      continue
    key, _, text = arg[len("--config."):].partition("=")
    node, seen = c, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = "config." + ".".join(seen) if seen else "config"
        close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
        hint = (f"did you mean --config.{'.'.join(seen + [close[0]])}?" if close else
                f"{where} has {', '.join(sorted(map(str, keys)))}." if keys else f"{where} is not a group.")
        _fail(f"--config.{key} is not a setting: {hint}")
      node, seen = node[part], seen + [part]
    _check_type(key, node, text)


def _check_type(key: str, old, text: str):
  kind = type(old)
  if kind is bool:
    ok = text.lower() in ("true", "false", "1", "0")
  elif kind in (int, float):
    try:
      kind(text)
      ok = True
    except ValueError:
      ok = kind is int and text.lstrip("-").replace("_", "").isdigit()
  else:
    return
  if not ok:
    _fail(f"--config.{key}={text!r} is not {'an' if kind is int else 'a'} {kind.__name__}: give a value of the "
          f"setting's type (now {old!r}).")


def _parse_flags(rest: list[str]) -> list[str]:
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    _fail(f"{_first_line(e).rstrip('.')}: the flags are --config=FILE.py[:ARG], --config.KEY=VALUE, "
          "--workdir=DIR, --cache_dir=DIR and --multihost.")


def _check_sweep_file(rest: list[str]):
  """Loads the sweep file once before the runner does, so that any error inside the user's file (a typo,
  a bad argument) is one sentence rather than the runner's trace."""
  specs, args = [], iter(rest[1:])
  for a in args:
    if a.startswith("-"):
      if "=" not in a and a not in ("--dry-run", "--dry_run", "--status", "--multihost"):
        next(args, None)  # the flag's value
    else:
      specs.append(a)
  if not specs or any(a in ("-h", "--help") for a in rest):
    return  # argparse says what is missing
  from jaxreplay.experiments import sweeps
  path = specs[0].partition(":")[0]
  if not path.endswith(".py") or not os.path.isfile(path):
    _fail(f"Sweep file {path!r} does not exist or is not a .py file: give the path to a file in sweeps/, "
          "e.g. sweeps/quickstart.py:small.")
  try:
    sweeps.load(specs[0])
  except Exception as e:  # the user's own file: any failure in it is theirs to fix, said in one line
    _fail(f"{e}" if isinstance(e, sweeps.SweepError) else
          f"sweep file {specs[0]} could not be loaded ({type(e).__name__}: {_first_line(e)}): fix the file or "
          "its argument.")


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command = argv[1]
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; users watch the progress bar
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}.")
  rest = [f"jaxreplay {command}"] + argv[2:]
  try:
    with _one_line_usage_errors(command):
      return _dispatch(command, rest)
  except OSError as e:  # a path that is missing or cannot be written, e.g. --workdir on a read-only disk
    where = f" {e.filename}" if e.filename else ""
    _fail(f"cannot write or read{where} ({e.strerror or type(e).__name__}): choose a path that exists and "
          "that you can write.")


INSTRUCT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps", "instruct.py")


def _dispatch(command: str, rest: list[str]) -> int:
  if command == "instruct":  # a short alias: finetune, with sweeps/instruct.py unless --config names another file
    command = "finetune"
    if _config_value(rest) is None:
      rest = rest[:1] + [f"--config={INSTRUCT_FILE}"] + rest[1:]
  if command in ("pretrain", "finetune"):
    rest, init_from = _take_init_from(rest)
    _check_overrides(rest)
    sys.argv = rest  # config_flags reads overrides from sys.argv itself
    main_fn = _train_main(command, init_from)
    main_fn(_parse_flags(rest))
  elif command == "data":
    from jaxreplay.data import commands
    return commands.main(rest)
  elif command == "sweep":
    _check_sweep_file(rest)
    from jaxreplay.experiments import sweeps
    return sweeps.main(rest)
  elif command == "report":
    from jaxreplay.experiments import report
    return report.main(rest)
  elif command == "eval":
    from jaxreplay.experiments import lm_eval_run as lm_eval_cli
    return lm_eval_cli.main(rest)
  elif command == "quickstart":
    from jaxreplay.experiments import quickstart
    return quickstart.main(rest)
  return 0


if __name__ == "__main__":
  sys.exit(main())
