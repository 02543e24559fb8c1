"""`jaxreplay COMMAND ...` (the commands: USAGE below): thin wrappers over the library.

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
from absl import logging

from jaxreplay.data import commands as data_commands
from jaxreplay.errors import UsageError, UserError
from jaxreplay.experiments import compile_command, lm_eval_run, quickstart, report, resolve, runner
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


def train_command(stage: str, rest: list[str], default_config: str | None = None):
  """`jaxreplay pretrain|finetune|instruct`: one run of the training stage."""
  overrides, rest = resolve.take_overrides(rest)
  p = argparse.ArgumentParser(prog=rest[0], allow_abbrev=False)
  p.add_argument("--config", default=default_config, help="experiment file, e.g. sweeps/quickstart.py:pretrain")
  p.add_argument("--workdir", help="directory for this run's checkpoints, metrics and exported weights")
  p.add_argument("--cache_dir", help="where default:LANG data is built (default: $JAXREPLAY_CACHE, "
                 "$XDG_CACHE_HOME/jaxreplay or ~/.cache/jaxreplay)")
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (TPU pods, multi-node GPU)")
  a = p.parse_args(rest[1:])
  if a.workdir is None:
    raise UsageError("--workdir is required: name the directory this run writes to.")
  if a.config is None:
    raise UsageError("--config is required, e.g. --config=sweeps/quickstart.py:pretrain.")
  if a.multihost:
    jax.distributed.initialize()  # coordinator and process ids come from the TPU / cluster environment
  c = resolve.run_config(a.config, a.workdir, overrides, a.cache_dir, stage=stage)
  result = training.run(c, a.workdir)
  print({k: v for k, v in result.items() if isinstance(v, (int, float, str))})
  return 0


# Each subcommand's entry point: it takes ["jaxreplay COMMAND", *flags] and returns the exit status.
MAINS = {"pretrain": functools.partial(train_command, "pretrain"),
         "finetune": functools.partial(train_command, "finetune"),
         "data": data_commands.main, "sweep": runner.main, "report": report.main,
         "quickstart": quickstart.main, "eval": lm_eval_run.main,
         "instruct": functools.partial(train_command, "finetune",
                                       default_config=os.path.join(resolve.SWEEPS_DIR, "instruct.py")),
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
