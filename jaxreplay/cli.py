"""`jaxreplay SUBCOMMAND ...`: thin wrappers over the library.

  jaxreplay pretrain --config=sweeps/quickstart.py:pretrain --config.model.d_model=256 --workdir=DIR
  jaxreplay finetune --config=sweeps/quickstart.py:finetune --config.init.from=DIR --workdir=DIR2
  jaxreplay data default|tokenizer|tokenize ...
  jaxreplay quickstart --workdir=runs/quickstart

Errors a user can cause end in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

USAGE = """usage: jaxreplay COMMAND [flags]

commands:
  pretrain     train a model from scratch:  --config=FILE.py[:ARG] [--config.KEY=VALUE ...] --workdir=DIR
  finetune     train from a finished run:   same flags; --config.init.from=PRETRAIN_WORKDIR
  data         make tokenizers and token files (jaxreplay data --help)
  sweep        run a grid of runs (jaxreplay sweep --help)
  report       tables and plots from a results table
  quickstart   pretrain on English, finetune on Spanish with and without self-generated replay
  instruct     finetune a Hugging Face Llama/Qwen on chat data with BOS-prompted replay (one run;
               a grid of them: jaxreplay sweep sweeps/instruct.py[:small] --workdir=DIR)
"""

COMMANDS = ("pretrain", "finetune", "data", "sweep", "report", "quickstart", "instruct")


def _user_errors():
  from jaxreplay.config import ConfigError
  from jaxreplay.checkpoint import CheckpointError
  from jaxreplay.data.errors import DataError
  from jaxreplay.sharding import MeshError
  from jaxreplay.train import TrainingError
  from jaxreplay.chat_data import ChatDataError
  from jaxreplay.models.hf_import import ImportError_
  from jaxreplay.mcq import MCQError
  return (ConfigError, CheckpointError, DataError, MeshError, TrainingError, ChatDataError, ImportError_, MCQError)


def _fail(message: str):
  print(f"jaxreplay: error: {message}", file=sys.stderr)
  sys.exit(2)


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
    from jaxreplay import train
    from jaxreplay.data import resolve_path
    try:
      c.data.path = resolve_path(c.data.path)
      if c.data.mix_path:
        c.data.mix_path = resolve_path(c.data.mix_path)
      result = train.run(c, FLAGS.workdir)
    except _user_errors() as e:
      _fail(str(e))
    print({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

  return main


def _parse_config_errors(argv):
  """absl reports a bad --config.KEY as a long trace; turn the common cases into one sentence."""
  for arg in argv:
    if arg.startswith("--config=") and ":" not in arg.split("=", 1)[1]:
      path = arg.split("=", 1)[1]
      if not os.path.exists(path):
        _fail(f"--config file {path!r} does not exist: give the path to an experiment file in sweeps/.")


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
  if command in ("pretrain", "finetune"):
    _parse_config_errors(rest)
    rest, init_from = _take_init_from(rest)
    sys.argv = rest  # config_flags reads overrides from sys.argv itself
    try:
      app.run(_train_main(command, init_from), argv=rest)
    except flags.Error as e:
      _fail(f"{e}: check the spelling of the --config key against jaxreplay/config.py.")
  elif command == "data":
    from jaxreplay.data import commands
    return commands.main(rest)
  elif command == "sweep":
    from jaxreplay import sweeps
    return sweeps.main(rest)
  elif command == "report":
    from jaxreplay import report
    return report.main(rest)
  elif command == "instruct":
    from jaxreplay import instruct
    return instruct.main(rest[1:])
  elif command == "quickstart":
    from jaxreplay import quickstart
    return quickstart.main(rest)
  return 0


if __name__ == "__main__":
  sys.exit(main())
