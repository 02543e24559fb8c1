"""`jaxreplay SUBCOMMAND ...`: thin wrappers over the library.

  jaxreplay pretrain --config=sweeps/quickstart.py:pretrain --config.model.d_model=256 --workdir=DIR
  jaxreplay finetune --config=sweeps/quickstart.py:finetune --config.init.from=DIR --workdir=DIR2
  jaxreplay data default|tokenizer|tokenize ...
  jaxreplay quickstart --workdir=runs/quickstart

Parse, dispatch, and map errors: every user error (`jaxreplay.errors.UserError`) and every path that cannot
be read or written ends in one sentence on stderr and exit status 2. The subcommands' work is in the library.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from jaxreplay import config as config_lib
from jaxreplay.data import commands as data_commands
from jaxreplay.data.commands import resolve_path
from jaxreplay.errors import UsageError, UserError
from jaxreplay.experiments import compile_command, config_files, lm_eval_run, quickstart, report, runner
from jaxreplay.train import loop as training

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
  compile      every program of a run compiled for a TPU slice, no TPU needed: the run's flags + --target=v5e:2x2
"""


def _print_and_exit(message: str):
  """The one way out of the CLI for a user's mistake: one line on stderr, exit status 2."""
  print(f"jaxreplay: error: {message}", file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def _one_line_usage_errors(command: str):
  """argparse prints its whole usage before a bad flag's message; a user needs the one line that says what
  is wrong. Every subcommand parses with argparse, so this covers them all for the length of one command."""
  def error(parser, message):
    raise UsageError(f"{message} (see `jaxreplay {command} --help`).")
  saved = argparse.ArgumentParser.error
  argparse.ArgumentParser.error = error
  try:
    yield
  finally:
    argparse.ArgumentParser.error = saved


def _define_train_flags():
  flags.DEFINE_string("workdir", None, "Directory for this run's checkpoints, metrics and exported weights.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")
  flags.DEFINE_string("cache_dir", None, "Where default:LANG data is built (default: $JAXREPLAY_CACHE, "
                      "$XDG_CACHE_HOME/jaxreplay or ~/.cache/jaxreplay).")
  config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. sweeps/quickstart.py:pretrain.",
                                  lock_config=True)


def _parse_train_flags(rest: list[str]) -> list[str]:
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    raise UsageError(f"{config_files.first_line(e).rstrip('.')}: the flags are --config=FILE.py[:ARG], "
                     "--config.KEY=VALUE, --workdir=DIR, --cache_dir=DIR and --multihost.") from None


def train_command(stage: str, rest: list[str]):
  """`jaxreplay pretrain|finetune`: one run of the training stage."""
  rest, init_from = config_files.take_init_from(rest)
  config_files.check_overrides(rest)
  sys.argv = rest  # config_flags reads overrides from sys.argv itself
  _define_train_flags()
  argv = _parse_train_flags(rest)
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}: pass settings as --config.KEY=VALUE.")
  if FLAGS.workdir is None:
    raise UsageError("--workdir is required: name the directory this run writes to.")
  if FLAGS.config is None:
    raise UsageError("--config is required, e.g. --config=sweeps/quickstart.py:pretrain.")
  if FLAGS.multihost:
    jax.distributed.initialize()  # coordinator and process ids come from the TPU / cluster environment
  c = FLAGS.config
  c.stage = stage
  if init_from is not None:
    c.init["from"] = init_from
  config_lib.validate(c)  # a bad value fails at once, before the default data is built or jax starts
  if init_from:  # the model shape is the parent's; a --config.model.X that contradicts it is an error
    explicit = [a[len("--config.model."):].split("=")[0] for a in rest if a.startswith("--config.model.")]
    training.inherit_parent_shape(c, init_from, explicit)
  if c.data.kind == "tokens":  # chat data: JSON-lines files, read as given
    c.data.path = resolve_path(c.data.path, FLAGS.cache_dir)
  if c.data.mix_path:
    c.data.mix_path = resolve_path(c.data.mix_path, FLAGS.cache_dir)
  result = training.run(c, FLAGS.workdir)
  print({k: v for k, v in result.items() if isinstance(v, (int, float, str))})
  return 0


def instruct_command(rest: list[str]):
  """`jaxreplay instruct`: finetune, with sweeps/instruct.py unless --config names another file."""
  if not any(a == "--config" or a.startswith("--config=") for a in rest):
    rest = rest[:1] + [f"--config={os.path.join(config_files.SWEEPS_DIR, 'instruct.py')}"] + rest[1:]
  return train_command("finetune", rest)


# Each subcommand's entry point: it takes ["jaxreplay COMMAND", *flags] and returns the exit status.
MAINS = {"pretrain": functools.partial(train_command, "pretrain"),
         "finetune": functools.partial(train_command, "finetune"),
         "data": data_commands.main, "sweep": runner.main, "report": report.main,
         "quickstart": quickstart.main, "instruct": instruct_command, "eval": lm_eval_run.main,
         "compile": compile_command.main}


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command = argv[1]
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; users watch the progress bar
  if command not in MAINS:
    _print_and_exit(f"unknown command {command!r}: use one of {', '.join(MAINS)}.")
  try:
    with _one_line_usage_errors(command):
      return MAINS[command]([f"jaxreplay {command}"] + argv[2:])
  except UserError as e:
    _print_and_exit(str(e))
  except OSError as e:  # a path that is missing or cannot be written, e.g. --workdir on a read-only disk
    where = f" {e.filename}" if e.filename else ""
    _print_and_exit(f"cannot write or read{where} ({e.strerror or type(e).__name__}): choose a path that exists and "
                    "that you can write.")


if __name__ == "__main__":
  sys.exit(main())
