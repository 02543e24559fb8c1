"""Experiment files (`FILE.py[:ARG]` with `get_config(arg)`) and the `--config.KEY=VALUE` overrides given on them.

Loading a file here, before `config_flags` loads it again, turns every failure inside the user's own file into
one sentence; checking each override against the config it made gives a misspelled key a 'did you mean'.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from jaxreplay.errors import ConfigError

FROM_FLAG = "--config.init.from"
# sweeps/ of the checkout the package is in (jaxreplay/experiments/ is two levels down)
SWEEPS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "sweeps")


def first_line(e: BaseException) -> str:
  """The first one or two non-empty lines of an exception's message (or its type when it has none)."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return " ".join(lines[:2]) if lines else type(e).__name__


def load_module(path: str, name: str):
  """The Python file at `path` imported as a module called `name`."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def config_value(argv: list[str]) -> str | None:
  """The value of --config in argv (FILE.py[:ARG]), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config":
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def take_init_from(argv: list[str]) -> tuple[list[str], str | None]:
  """argv without --config.init.from, and its value: `from` is a Python keyword, which ml_collections' path
  parser rejects."""
  rest, value = [], None
  it = iter(argv)
  for arg in it:
    if arg.startswith(FROM_FLAG + "="):
      value = arg.split("=", 1)[1]
    elif arg == FROM_FLAG:
      value = next(it, "")
    else:
      rest.append(arg)
  return rest, value


def load_experiment(value: str):
  """The config an experiment file FILE.py[:ARG] makes; ConfigError saying why when it cannot be loaded."""
  path, _, arg = value.partition(":")
  if not path.endswith(".py") or not os.path.isfile(path):
    raise ConfigError(f"--config file {path!r} does not exist: give the path to an experiment file in sweeps/, "
                      "e.g. --config=sweeps/quickstart.py:pretrain.")
  try:
    module = load_module(path, "jaxreplay_cli_experiment")
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # the user's own file: any failure in it is theirs to fix, said in one line
    raise ConfigError(f"--config={value} could not be loaded ({type(e).__name__}: {first_line(e)}): fix the "
                      "experiment file or its argument.") from None


def check_overrides(argv: list[str]):
  """Every --config.KEY=VALUE must name an existing setting (a misspelled one gets a 'did you mean') and
  give a value of its type."""
  value = config_value(argv)
  if value is None:
    return
  c = load_experiment(value)
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith(FROM_FLAG):
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
        raise ConfigError(f"--config.{key} is not a setting: {hint}")
      node, seen = node[part], seen + [part]
    check_type(key, node, text)


def check_type(key: str, old, text: str):
  """ConfigError when `text` cannot become a value of the type of the setting's current value `old`."""
  kind = type(old)
  if kind not in (bool, int, float):
    return
  try:
    ok = text.lower() in ("true", "false", "1", "0") if kind is bool else isinstance(kind(text), kind)
  except ValueError:
    ok = kind is int and text.lstrip("-").replace("_", "").isdigit()
  if not ok:
    raise ConfigError(f"--config.{key}={text!r} is not {'an' if kind is int else 'a'} {kind.__name__}: give a "
                      f"value of the setting's type (now {old!r}).")
