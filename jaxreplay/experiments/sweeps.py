"""Sweep definitions: a grid of runs in stages, each run named by its overrides, in dependency order.

A sweep file (`sweeps/*.py`) has `get_sweep(arg) -> Sweep` (`jaxreplay sweep FILE.py:ARG` passes ARG) and
`VARIANTS = {ARG: what it runs}` listing every ARG it accepts ('' for none; N stands for a number, `seed=N`):

  s = sweeps.Sweep("what this sweep measures")
  pre = s.stage("pretrain", base=pre_config, grid=sweeps.product({"model.d_model": [256, 384]},
                                                                 {"stop.tokens_per_param": [20, 80]}))
  s.stage("finetune", base=ft_config, grid={"replay.coeff": [0.1, 1.0]}, after=pre)

A grid is a list of override dicts (dotted config keys → values); `product`, `zip_` and `chain` build them,
and a plain dict {key: [values]} is the product of its lists. A grid over one stop length (e.g.
stop.tokens_per_param) replaces the base's length criterion. `after=` makes each run of this stage a
finetuning run of each named run: a stage (every run of it), (stage, {key: value}) (its runs with those
overrides), or a list of run names; `match=` pairs a child only with parents that agree on the given keys.
A child's `init.from` is the NAME of its parent; the runner turns it into that run's workdir. A child takes
every model key its weights depend on from its parent (`resolve.take_parent_shape`); a child grid key that
contradicts its parent is an error at expansion.

Run names are `STAGE/LABEL` for runs that start from nothing and `STAGE/PARENT_NAME/LABEL` for the others
(`/LABEL` left out when the run has no overrides of its own); LABEL is `key=value,...` over the overrides
(short keys, see ABBREV) or, past MAX_LABEL characters, a readable prefix and a hash. `expand` turns a Sweep
into plain `Run`s and checks everything (keys, types, dependencies, cycles, config.validate) before anything
runs; `runner.py` runs them and `sweepdir.py` keeps their state. A run whose config sets model.path (e.g.
sweeps/instruct.py) starts from that Hugging Face checkpoint, never after= a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re

import ml_collections

from jaxreplay import config as config_lib
from jaxreplay.errors import ConfigError, SweepError
from jaxreplay.experiments import resolve


# Short names for common keys in run labels; any other key shows its last component (or all of it when two
# overridden keys share a last component).
ABBREV = {
    "stop.tokens_per_param": "tpp", "model.d_model": "d", "model.n_layers": "L", "optim.lr": "lr",
    "optim.batch_size": "bs", "data.mix_fraction": "mix", "replay.method": "method", "replay.source": "src",
    "replay.coeff": "coeff", "replay.batch_size": "rbs", "lora.rank": "lora", "optim.b2": "b2",
    "optim.b2_half_life_tokens": "b2_hl", "stop.target_loss": "target", "optim.schedule": "sched",
}
MAX_LABEL = 96
FROM = "init.from"


def product(*parts) -> list[dict]:
  """Cartesian product of parts; a part is a dict {key: [values]} (itself a product) or a list of overrides."""
  lists = [_as_grid(p) for p in parts]
  out = []
  for combo in itertools.product(*lists):
    merged = {}
    for d in combo:
      for k, v in d.items():
        if k in merged and merged[k] != v:
          raise SweepError(f"Grid key {k!r} is set twice in one product with different values: "
                           "put it in one factor only.")
        merged[k] = v
    out.append(merged)
  return out


def zip_(spec: dict) -> list[dict]:
  """Zip of equal-length value lists: {a: [1, 2], b: [3, 4]} -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
  lengths = {k: len(v) for k, v in spec.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zip_ needs lists of one length, got {lengths}: give every key the same number of values.")
  keys = list(spec)
  return [dict(zip(keys, vals)) for vals in zip(*(spec[k] for k in keys))]


def chain(*parts) -> list[dict]:
  """The runs of every part, one after the other (a union of grids)."""
  return [d for p in parts for d in _as_grid(p)]


def _as_grid(part) -> list[dict]:
  if isinstance(part, dict):
    for k, v in part.items():
      if not isinstance(v, (list, tuple)):
        raise SweepError(f"Grid key {k!r} needs a list of values, got {v!r}: write [{v!r}].")
    keys = list(part)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(part[k] for k in keys))]
  if isinstance(part, (list, tuple)) and all(isinstance(d, dict) for d in part):
    return [dict(d) for d in part]
  raise SweepError(f"A grid part must be a dict of value lists or a list of override dicts, got {part!r}.")


@dataclasses.dataclass
class Stage:
  name: str
  base: ml_collections.ConfigDict
  grid: list
  after: object = None  # a Stage, a stage name, (stage, {key: value}) or a list of run names
  abbrev: dict = dataclasses.field(default_factory=dict)
  match: tuple = ()  # keys (or key prefixes) a child shares with its parent when the parent's overrides set them


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  stage: str
  parent: str | None  # run whose exported weights start this one
  overrides: dict  # the grid overrides that define this run (init.from holds the parent's NAME)
  config: dict  # the full config (init.from still the parent's name; the runner sets its workdir)


class Sweep:
  def __init__(self, description: str = "", pack: int = 1):
    """pack: the default of `jaxreplay sweep --pack` for this sweep (runs trained together, experiments/packing.py)."""
    self.description = description
    self.pack = pack
    self.stages: list[Stage] = []

  def stage(self, name: str, base, grid=None, after=None, abbrev=None, match=()) -> Stage:
    """Adds a stage: every override set of GRID applied to BASE, started from each run named by AFTER.

    after: None (runs start from nothing), a Stage or stage name (every run of it), (stage, {key: value})
    (its runs with those overrides), or a list of run names. match: keys a child must share with its parent
    when the parent overrides them, e.g. ("replay",) for chains of finetuning stages that keep one replay
    setting; the child's label leaves those out (its parent's name shows them).
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) or name == "base":
      raise SweepError(f"Stage name {name!r} is invalid: use letters, digits, '_', '-', '.' (not 'base').")
    if any(s.name == name for s in self.stages):
      raise SweepError(f"Stage {name!r} is defined twice: give every stage its own name.")
    s = Stage(name, base, _as_grid(grid if grid is not None else [{}]), after, dict(abbrev or {}), tuple(match))
    self.stages.append(s)
    return s


def format_value(v) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, float):
    if v.is_integer() and abs(v) < 1e9:
      return str(int(v))
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.3g}".replace("e-0", "e-").replace("e+0", "e+")
  return str(v)


def _short(key: str, keys, abbrev: dict) -> str:
  last = key.rsplit(".", 1)[-1]
  same = [k for k in keys if k.rsplit(".", 1)[-1] == last]
  return {**ABBREV, **abbrev}.get(key, key if len(same) > 1 else last)


def label(overrides: dict, abbrev: dict | None = None) -> str:
  """`key=value,...` for the overrides (init.from excluded); `base` when there are none."""
  keys = [k for k in overrides if k != FROM]
  if not keys:
    return "base"
  text = ",".join(f"{_short(k, keys, abbrev or {})}={format_value(overrides[k])}" for k in keys)
  text = re.sub(r"[^A-Za-z0-9_.,=:+-]", "_", text)
  if len(text) > MAX_LABEL:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
    text = f"{text[:MAX_LABEL - 12].rstrip(',')}~{digest}"
  return text


def _apply(base: ml_collections.ConfigDict, overrides: dict, stage: str, run: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())  # a deep copy (deepcopy of a ConfigDict is slow)
  lengths = [k for k in overrides if k.startswith("stop.") and k[5:] in config_lib.LENGTH_KEYS]
  if lengths:  # a grid over one length criterion replaces the base's (e.g. stop.tokens → stop.tokens_per_param)
    for k in config_lib.LENGTH_KEYS:
      if f"stop.{k}" not in lengths:
        c.stop[k] = type(c.stop[k])(0)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node, group = c, ml_collections.ConfigDict
    for p in parents:
      node = node.get(p) if isinstance(node, group) else None
    if not isinstance(node, group) or leaf not in node or isinstance(node[leaf], group):
      raise SweepError(f"Grid key {key!r} of stage {stage!r} is not a config key: check its spelling against "
                       "jaxreplay/config.py.")
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f"Grid value {key}={value!r} of run {run!r} has the wrong type ({e}): use a "
                       f"{type(node[leaf]).__name__}.") from None
  return c


def expand(sweep: Sweep) -> list[Run]:
  """All runs of a sweep in dependency order; raises SweepError (or ConfigError) before anything runs."""
  if not sweep.stages:
    raise SweepError("The sweep defines no stages: add one with sweep.stage(...).")
  runs: dict[str, Run] = {}
  configs = {}
  by_stage: dict[str, list[str]] = {}
  for st in sweep.stages:
    parents = _parents(st, sweep, by_stage)
    names = []
    for ov in st.grid:
      if FROM in ov and parents is not None:
        raise SweepError(f"Stage {st.name!r} sets both after= and an {FROM} grid key: use one of them.")
      for parent, pov in (parents if parents is not None else [(ov.get(FROM) or None, {})]):
        matched = [k for k in ov if any(k == m or k.startswith(m + ".") for m in st.match)]
        if any(k in pov and pov[k] != ov[k] for k in matched):
          continue
        overrides = dict(ov)
        if parent:
          overrides[FROM] = parent
        shown = {k: v for k, v in overrides.items() if not (k in matched and k in pov and pov[k] == v)}
        lab = label(shown, st.abbrev)  # a matched key the parent's name already shows is left out
        name = "/".join([st.name] + ([parent] if parent else []) + ([lab] if lab != "base" else []))
        if name in runs:
          raise SweepError(f"Two runs of stage {st.name!r} are both named {name!r}: their overrides give the same "
                           "label; give them different values or an abbrev that tells them apart.")
        if parent and st.base.model.get("path"):
          raise SweepError(f"Stage {st.name!r} finetunes the Hugging Face checkpoint in config.model.path, not "
                           "another run: leave out after=.")
        c = _apply(st.base, overrides, st.name, name)
        if parent:
          c.stage = "finetune"
        configs[name] = c
        runs[name] = Run(name, st.name, parent, overrides, c.to_dict())
        names.append((name, overrides))
    by_stage[st.name] = names
  ordered = [_inherit_shape(r, configs) for r in dependency_order(runs)]
  _check_prefixes(ordered)
  for run in ordered:
    try:
      config_lib.validate(configs[run.name])
    except ConfigError as e:
      raise ConfigError(f"Run {run.name!r}: {e}") from None
  return ordered


def _inherit_shape(run: Run, configs: dict) -> Run:
  """A finetuning run's model keys that its weights depend on come from its parent (already resolved: runs
  arrive parents first); one of them set explicitly by the child's grid to another value is an error."""
  if not run.parent:
    return run
  c = configs[run.name]
  resolve.take_parent_shape(c, configs[run.parent].to_dict(),
                            [k[len("model."):] for k in run.overrides if k.startswith("model.")], f"Run {run.name!r}: ")
  return dataclasses.replace(run, config=c.to_dict())


def _parents(st: Stage, sweep: Sweep, by_stage: dict):
  if st.after is None:
    return None
  after, where = st.after, None
  if isinstance(after, tuple) and len(after) == 2 and isinstance(after[1], dict):
    after, where = after
  if isinstance(after, Stage):
    after = after.name
  if isinstance(after, str):
    if after not in by_stage:
      known = [s.name for s in sweep.stages]
      raise SweepError(f"Stage {st.name!r} starts from stage {after!r}, which is not defined before it "
                       f"(stages: {', '.join(known)}): define that stage first or fix the name.")
    out = [(n, ov) for n, ov in by_stage[after] if not where or all(ov.get(k) == v for k, v in where.items())]
    if not out:
      raise SweepError(f"Stage {st.name!r} starts from the runs of stage {after!r} with {where}, but no run of it "
                       "has those overrides: check the keys and values.")
    return out
  if isinstance(after, (list, tuple)) and all(isinstance(a, str) for a in after):
    return [(a, {}) for a in after]
  raise SweepError(f"Stage {st.name!r}: after= must be a stage, a stage name or a list of run names, got {after!r}.")


def dependency_order(runs: dict[str, Run]) -> list[Run]:
  for run in runs.values():
    if run.parent and run.parent not in runs:
      close = [n for n in runs if n.split("/")[0] == run.parent.split("/")[0]][:3]
      raise SweepError(f"Run {run.name!r} starts from {run.parent!r}, which the sweep does not define"
                       + (f" (e.g. {', '.join(close)})" if close else "") + ": name a run of the sweep.")
  order, placed = [], set()
  for start in runs:  # each run after the chain of runs it starts from; a run met twice on one chain is a cycle
    path, node = [], start
    while node is not None and node not in placed:
      if node in path:
        cycle = path[path.index(node):] + [node]
        raise SweepError(f"The runs form a cycle ({' -> '.join(cycle)}): a run cannot start from its own descendant.")
      path.append(node)
      node = runs[node].parent
    for n in reversed(path):
      placed.add(n)
      order.append(runs[n])
  return order


def _check_prefixes(runs: list[Run]):
  names = sorted(r.name for r in runs)
  for a, b in zip(names, names[1:]):
    if b.startswith(a + "/"):
      raise SweepError(f"Run {a!r} would hold run {b!r} inside its workdir: rename the stage or the overrides.")


def fingerprint(runs: list[Run]) -> str:
  blob = json.dumps([dataclasses.asdict(r) for r in runs], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def variants(path: str, module=None) -> dict[str, str]:
  """The variants a sweep file declares: its VARIANTS dict, {ARG: what it runs}; '' is the file with no ARG.

  An upper-case N in an ARG stands for any whole number (`seed=N`). module: the file, when already loaded.
  """
  declared = getattr(module or resolve.experiment_file(path, "Sweep file", SweepError), "VARIANTS", None)
  if not isinstance(declared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in declared.items()):
    raise SweepError(f"{path} declares no VARIANTS: add VARIANTS = {{'': 'what the file runs', 'small': ...}} "
                     "listing every ARG its get_sweep accepts.")
  return dict(declared)


def format_variants(path: str) -> str:
  return "\n".join(f"  {(':' + k) if k else '(none)':<12} {v}" for k, v in variants(path).items())


def load(spec: str) -> Sweep:
  """A sweep from `path/to/file.py[:ARG]`: the file's get_sweep(ARG) (get_sweep() without an ARG)."""
  path, _, arg = spec.partition(":")
  module = resolve.experiment_file(path, "Sweep file", SweepError)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep(arg) function: add one that returns a jaxreplay.experiments.sweeps.Sweep.")
  if hasattr(module, "VARIANTS"):  # a file of one's own may leave them out; every file in sweeps/ declares them
    declared = variants(path, module)
    patterns = ["".join(r"\d+" if ch == "N" else re.escape(ch) for ch in k) for k in declared]  # N: a number
    if not any(re.fullmatch(p, arg) for p in patterns):  # said before get_sweep runs
      names = ", ".join(f"{k!r}" if k else "'' (no argument)" for k in declared)
      raise SweepError(f"{path} has no variant {arg!r}: use one of {names} (see `jaxreplay sweep {path} "
                       "--variants`).")
  sweep = resolve.call(module, "get_sweep", spec, SweepError)
  if not isinstance(sweep, Sweep):
    raise SweepError(f"{path}: get_sweep returned {type(sweep).__name__}, not a jaxreplay.experiments.sweeps.Sweep.")
  return sweep
