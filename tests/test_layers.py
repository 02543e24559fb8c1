"""The package's shape, read from its source with `ast` (nothing is imported): layers that import one way
(docs/architecture.md, "Layers"), no circle, imports at the top of files, no private name used across modules, small files and
functions (docs/architecture.md explains the layers). Each exception is listed below with its reason, and an exception that no longer applies fails too.
"""

import ast
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxreplay")

# docs/architecture.md "Layers": each layer imports only itself and the layers below it.
LAYERS = {
    "jaxreplay": 0, "jaxreplay.errors": 0, "jaxreplay.io": 0, "jaxreplay.config": 0, "jaxreplay.sharding": 0,
    "jaxreplay.platform": 0, "jaxreplay.rundir": 0,
    "jaxreplay.models": 1, "jaxreplay.data": 1,
    "jaxreplay.replay": 2, "jaxreplay.evals": 2,
    "jaxreplay.train": 3,
    "jaxreplay.experiments": 4,
    "jaxreplay.cli": 5,
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80

# Modules that import an optional extra at their top: importing them inside a function keeps the package
# usable without that extra.
OPTIONAL = {"jaxreplay.evals.lm_eval": "lm-eval (the `eval` extra)"}

# (importer, imported): imports against the layers, or inside functions, that are not fixed yet.
ALLOWED_IMPORTS = {
}
ALLOWED_LAZY = {
}
# Files and functions over the limits (path relative to the repository, function as path:name).
ALLOWED_LONG = {
}
# (user: a module, or a test file's name; module; private name) used across modules for now.
ALLOWED_PRIVATE = {
}


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_files() -> dict:
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        out[module_name(os.path.join(folder, n))] = os.path.join(folder, n)
  return out


MODULES = package_files()


def layer(module: str) -> int:
  parts = module.split(".")
  for k in range(len(parts), 0, -1):
    if ".".join(parts[:k]) in LAYERS:
      return LAYERS[".".join(parts[:k])]
  raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py (and docs/architecture.md)")


def top_level_nodes(tree: ast.Module) -> set:
  """Statements run when the module is imported: the body, and inside top-level if/try blocks."""
  out, todo = set(), list(tree.body)
  while todo:
    node = todo.pop()
    out.add(id(node))
    if isinstance(node, (ast.If, ast.Try)):
      todo += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
    if isinstance(node, ast.ExceptHandler):
      todo += node.body
  return out


def imports(module: str, tree: ast.Module):
  """(imported jaxreplay module, names imported from it, node, at top level) for every import statement."""
  top = top_level_nodes(tree)
  package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxreplay":
          yield a.name, [], node, id(node) in top
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      if base.split(".")[0] != "jaxreplay":
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        yield (sub, [], node, id(node) in top) if sub in MODULES else (base, [a.name], node, id(node) in top)


@functools.lru_cache(maxsize=1)
def parsed() -> tuple:
  """(module, path, syntax tree) of every module of the package, parsed once."""
  out = []
  for module, path in sorted(MODULES.items()):
    with open(path) as f:
      out.append((module, path, ast.parse(f.read(), path)))
  return tuple(out)


@functools.lru_cache(maxsize=1)
def edges() -> dict:
  out = {}
  for module, _, tree in parsed():
    for target, _, node, at_top in imports(module, tree):
      out.setdefault((module, target), []).append((node.lineno, at_top))
  return out


def test_every_import_goes_to_the_same_or_a_lower_layer():
  bad = [f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)}), line {lines[0][0]}"
         for (src, dst), lines in edges().items()
         if layer(dst) > layer(src) and (src, dst) not in ALLOWED_IMPORTS]
  assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_docs_architecture_lists_the_same_layers():
  """The table of docs/architecture.md names each entry of LAYERS in its layer, and nothing else."""
  with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
    rows = [line.split("|") for line in f if re.match(r"\| \d \|", line)]
  documented = {"jaxreplay." + name.strip("`/").removesuffix(".py"): int(row[1])
                for row in rows for name in re.findall(r"`[a-z_]+/?`", row[2])}
  assert documented == {k: v for k, v in LAYERS.items() if k != "jaxreplay"}


def test_the_import_graph_has_no_cycle():
  graph = {}
  for src, dst in edges():
    if src != dst and (src, dst) not in ALLOWED_IMPORTS and (src, dst) not in ALLOWED_LAZY:
      graph.setdefault(src, set()).add(dst)
  state, cycles = {}, []

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_jaxreplay_modules_are_imported_at_the_top_of_files():
  bad = [f"{src} imports {dst} inside a function (line {line}): move it to the top of the file"
         for (src, dst), lines in edges().items() for line, at_top in lines
         if not at_top and dst not in OPTIONAL and (src, dst) not in ALLOWED_LAZY]
  assert not bad, "\n".join(bad)


def private_uses(tree: ast.Module, module: str | None):
  """(jaxreplay module, private name, line) for each `from M import _x` and `M._x` whose M is a jaxreplay
  module other than `module` itself (module None: a test file)."""
  aliases = {}
  for target, names, node, _ in imports(module, tree) if module else imports_of_a_test(tree):
    if target == module:
      continue
    for n in names:
      if n.startswith("_"):
        yield target, n, node.lineno
    for a in node.names:
      if isinstance(node, ast.Import) and a.name == target:
        aliases[a.asname or a.name] = target if a.asname else target.split(".")[0]
      elif isinstance(node, ast.ImportFrom) and not names and target.endswith("." + a.name):
        aliases[a.asname or a.name] = target  # `from package import module [as alias]`
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
      base = ast.unparse(node.value)
      if base in aliases and aliases[base] != module:
        yield aliases[base], node.attr, node.lineno


def imports_of_a_test(tree: ast.Module):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxreplay":
          yield a.name, [], node, True
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxreplay":
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        yield (sub, [], node, True) if sub in MODULES else (node.module, [a.name], node, True)


def all_private_uses() -> dict:
  """{(user, module, private name): line}; user is a jaxreplay module or a test file's name."""
  out = {(module, target, name): line for module, _, tree in parsed()
         for target, name, line in private_uses(tree, module)}
  tests = os.path.join(ROOT, "tests")
  for n in sorted(os.listdir(tests)):
    if n.endswith(".py"):
      with open(os.path.join(tests, n)) as f:
        tree = ast.parse(f.read())
      out.update({(n, target, name): line for target, name, line in private_uses(tree, None)})
  return out


def test_no_private_name_is_used_across_modules():
  bad = [f"{user} uses {target}.{name} (line {line}): make it public if it is part of {target}'s contract"
         for (user, target, name), line in all_private_uses().items() if (user, target, name) not in ALLOWED_PRIVATE]
  assert not bad, "\n".join(bad)


def test_files_and_functions_are_small():
  bad = []
  for _, path, tree in parsed():
    rel = os.path.relpath(path, ROOT)
    with open(path) as f:
      n = len(f.read().splitlines())
    if n > MAX_FILE_LINES and rel not in ALLOWED_LONG:
      bad.append(f"{rel} has {n} lines (at most {MAX_FILE_LINES}): split it by concern")
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in ALLOWED_LONG:
          bad.append(f"{rel}:{node.name} has {length} lines (at most {MAX_FUNCTION_LINES})")
  assert not bad, "\n".join(bad)


def test_every_exception_listed_here_still_applies():
  """An entry whose file was split, or whose import was fixed, goes from the lists above."""
  found = edges()
  stale = [f"ALLOWED_IMPORTS {k}" for k in ALLOWED_IMPORTS if k not in found]
  stale += [f"ALLOWED_LAZY {k}" for k in ALLOWED_LAZY if not any(not top for _, top in found.get(k, []))]
  stale += [f"ALLOWED_PRIVATE {k}" for k in ALLOWED_PRIVATE if k not in all_private_uses()]
  for key in ALLOWED_LONG:
    rel, _, func = key.partition(":")
    path = os.path.join(ROOT, rel)
    if not os.path.exists(path):
      stale.append(f"ALLOWED_LONG {key}")
      continue
    with open(path) as f:
      text = f.read()
    if not func and len(text.splitlines()) <= MAX_FILE_LINES:
      stale.append(f"ALLOWED_LONG {key}")
    if func and not any(isinstance(n, ast.FunctionDef) and n.name == func
                        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES for n in ast.walk(ast.parse(text))):
      stale.append(f"ALLOWED_LONG {key}")
  assert not stale, "exceptions that no longer apply (remove them):\n" + "\n".join(stale)


def test_the_checks_catch_what_they_look_for(tmp_path):
  """The readers above on hand-made sources: an upward, a lazy and a private import are all seen."""
  src = ("from jaxreplay.experiments import runner\nfrom jaxreplay.config import _hidden\n"
         "import jaxreplay.train.loop as training\n"
         "def f():\n  from jaxreplay.train import loop\n  return runner._worker, training._x\n")
  MODULES["jaxreplay.models.fake"] = str(tmp_path / "fake.py")
  try:
    found = {(dst, tuple(names), top) for dst, names, _, top in imports("jaxreplay.models.fake", ast.parse(src))}
    uses = {(t, n) for t, n, _ in private_uses(ast.parse(src), "jaxreplay.models.fake")}
  finally:
    del MODULES["jaxreplay.models.fake"]
  assert ("jaxreplay.experiments.runner", (), True) in found and ("jaxreplay.train.loop", (), False) in found
  assert layer("jaxreplay.experiments.runner") > layer("jaxreplay.models.fake")
  assert uses == {("jaxreplay.config", "_hidden"), ("jaxreplay.experiments.runner", "_worker"),
                  ("jaxreplay.train.loop", "_x")}
