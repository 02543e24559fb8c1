"""The one way in: an experiment file (`FILE.py[:ARG]` with `get_config(arg)`) or a sweep's run, the
`--config.KEY=VALUE` overrides given on it, a workdir and a data cache become one validated run config.

`run_config` is what every command calls (pretrain, finetune, instruct, quickstart, sweeps and their workers,
packs): it loads the file once with its folder importable, applies the overrides (a misspelled key gets a
'did you mean'), validates, takes the model shape of the run in init.from, resolves every `default:` and
local data path, and refuses a workdir that holds another run. Nothing after it resolves or validates again.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys

import ml_collections

from jaxreplay import config as config_lib, io
from jaxreplay.data.commands import resolve_path
from jaxreplay.errors import ConfigError, DataError, UsageError, UserError
from jaxreplay.models import export as export_lib

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The experiment files commands load by default: shipped in the wheel as jaxreplay/sweeps, else the checkout's sweeps/.
SWEEPS_DIR = next((d for d in (os.path.join(_PACKAGE, "sweeps"), os.path.join(os.path.dirname(_PACKAGE), "sweeps"))
                   if os.path.isdir(d)), os.path.join(_PACKAGE, "sweeps"))
TOKEN_PATHS = ("data.path", "data.mix_path", "replay.path")  # token directories, or default:LANG[:VOCAB]


def first_line(e: BaseException) -> str:
  """The first one or two non-empty lines of an exception's message (or its type when it has none)."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return " ".join(lines[:2]) if lines else type(e).__name__


def find_file(path: str) -> str:
  """`path`, or, when it names no file here, the shipped experiment file of that name (`sweeps/instruct.py` or
  `instruct.py`), so the documented commands work from an installed package in any directory."""
  shipped = os.path.join(SWEEPS_DIR, os.path.basename(path))
  if not os.path.exists(path) and os.path.dirname(os.path.normpath(path)) in ("", "sweeps") and os.path.isfile(shipped):
    return shipped
  return path


def load_file(path: str):
  """The Python file at `path` as a module; its folder is importable, so it may import helpers next to it
  (sweeps/_paper.py, sweeps/_tiny_llama.py). Failures inside it propagate to the caller, who words them."""
  folder = os.path.dirname(os.path.abspath(path))
  if folder not in sys.path:
    sys.path.insert(0, folder)
  name = "jaxreplay_experiment_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def experiment_file(path: str, what: str = "--config file", error=ConfigError):
  """The experiment (or sweep) file at `path` (see find_file), loaded; `error` saying why when it cannot be."""
  path = find_file(path)
  if not path.endswith(".py") or not os.path.isfile(path):
    raise error(f"{what} {path!r} does not exist or is not a .py file: give the path to an experiment file in "
                "sweeps/, e.g. sweeps/quickstart.py.")
  try:
    return load_file(path)
  except Exception as e:  # the user's own file: any failure in it is theirs to fix, said in one line
    raise error(f"{what} {path} could not be loaded ({type(e).__name__}: {first_line(e)}): fix it.") from None


def call(module, function: str, value: str, error=ConfigError):
  """module.function(ARG) for FILE.py[:ARG] (`value`; function() without an ARG); `error` saying why it failed."""
  arg = value.partition(":")[2]
  try:
    return getattr(module, function)(arg) if arg else getattr(module, function)()
  except UserError:  # already one sentence
    raise
  except Exception as e:  # as in experiment_file
    raise error(f"{value}: {function}({arg!r}) failed ({type(e).__name__}: {first_line(e)}): fix the file or its "
                "argument.") from None


def experiment_config(value: str, module=None) -> ml_collections.ConfigDict:
  """The config FILE.py[:ARG] makes (`module`: the file, when already loaded); ConfigError saying why not."""
  return call(module or experiment_file(value.partition(":")[0]), "get_config", value)


def take_overrides(argv: list[str]) -> tuple[dict, list[str]]:
  """({KEY: text} of argv's --config.KEY=VALUE and --config.KEY VALUE, the other arguments). A key given twice
  with different values is refused."""
  overrides, rest, it = {}, [], iter(argv)
  for arg in it:
    if not arg.startswith("--config."):
      rest.append(arg)
      continue
    key, eq, text = arg[len("--config."):].partition("=")
    text = text if eq else next(it, "")
    if overrides.get(key, text) != text:
      raise UsageError(f"--config.{key} is given twice, as {overrides[key]!r} and {text!r}: give it once.")
    overrides[key] = text
  return overrides, rest


def _node(c, key: str):
  """(group, leaf) of the dotted key in c; ConfigError with a 'did you mean' when it names no setting."""
  node, seen = c, []
  for part in key.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = "config." + ".".join(seen) if seen else "config"
      close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
      hint = (f"did you mean --config.{'.'.join(seen + [close[0]])}?" if close else
              f"{where} has {', '.join(sorted(map(str, keys)))}." if keys else f"{where} is not a group.")
      raise ConfigError(f"--config.{key} is not a setting: {hint}")
    parent, node, seen = node, node[part], seen + [part]
  return parent, part


def _value(key: str, old, text: str):
  """`text` as a value of the type of the setting's current value `old`; ConfigError when it is not one."""
  kind = type(old)
  try:
    if kind is bool and text.lower() in ("true", "false", "1", "0"):
      return text.lower() in ("true", "1")
    if kind in (int, float):
      return kind(text.replace("_", ""))
  except ValueError:
    pass
  if kind not in (bool, int, float):
    return text
  raise ConfigError(f"--config.{key}={text!r} is not {'an' if kind is int else 'a'} {kind.__name__}: give a "
                    f"value of the setting's type (now {old!r}).")


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict):
  for key, text in overrides.items():
    group, leaf = _node(c, key)
    group[leaf] = _value(key, group[leaf], text)


def take_parent_shape(c, parent: dict, explicit=(), where: str = ""):
  """c's model keys that the weights depend on become those of the run it starts from (`parent`: its config),
  unless the user set one (`explicit`, e.g. 'd_model') to another value, which is an error."""
  conflicts = config_lib.inherit_model_shape(c, parent, explicit)
  if conflicts:
    k = conflicts[0]
    raise ConfigError(f"{where}config.model.{k}={c.model[k]!r} differs from the run in init.from "
                      f"({parent['model'][k]!r}): finetuning keeps the pretrained model's shape, so drop model.{k}.")


def _resolve_paths(c, cache_dir, check: bool):
  """Token directories (and default:LANG[:VOCAB], built on first use) as absolute paths, each checked (`check`)
  under its own key; chat data's files are read as given."""
  if c.data.get("kind", "tokens") != "tokens":  # .get: a sweep's run stored before the key existed
    return
  for key in TOKEN_PATHS:
    group, leaf = key.split(".")
    value = c[group][leaf]
    if not value and key != "data.path":
      continue
    path = resolve_path(value, cache_dir)
    if check and not io.isdir(path):  # path may be a URL (gs://...)
      raise DataError(f"Token directory {path} does not exist: create it with `jaxreplay data tokenize` or fix "
                      f"config.{key}.")
    c[group][leaf] = path


def check_storage(c, workdir: str):
  """A run on a bucket is resumed by whichever host is free, so the run it starts from and the replay sample cache
  it shares must be in a bucket too, not on one host's disk. Token data may stay local (each host builds its own
  default: data), and a local run may read from a bucket."""
  local = {k: v for k, v in (("init.from", c.init["from"]), ("replay.cache_dir", c.replay.get("cache_dir", "")))
           if v and not io.is_url(v)}
  if io.is_url(workdir) and local:
    io.check_same_storage(workdir=workdir, **local)


def run_config(experiment, workdir: str | None, overrides: dict | None = None, cache_dir: str | None = None,
               stage: str | None = None, init_from: str | None = None, planning: bool = False):
  """The validated config of the run in `workdir`: `experiment` is FILE.py[:ARG] or a config (a sweep's run,
  copied); `overrides` {KEY: text}; `stage` and `init_from` (a workdir) set those keys. `planning` (a sweep's
  plan, made before its parents trained) keeps the shape the sweep's expansion took and checks no directory. No
  `workdir` (`jaxreplay compile`): shapes only, data paths left as given."""
  if isinstance(experiment, str):
    c = experiment_config(experiment)
  else:
    c = ml_collections.ConfigDict(experiment.to_dict() if hasattr(experiment, "to_dict") else experiment)
    c.lock()
  apply_overrides(c, overrides or {})
  if stage:
    c.stage = stage
  if init_from is not None:
    c.init["from"] = init_from
  config_lib.validate(c)  # a bad value fails at once, before the default data is built or jax starts
  if workdir is not None:
    check_storage(c, workdir)
  if c.init["from"] and not planning:
    take_parent_shape(c, export_lib.exported_config(c.init["from"]),
                      [k[len("model."):] for k in overrides or {} if k.startswith("model.")])
  if workdir is None:
    return c
  _resolve_paths(c, cache_dir, check=not planning)
  if not planning:
    config_lib.check_workdir(c, workdir)
  return c
