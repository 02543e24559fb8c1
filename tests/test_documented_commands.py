"""Every command README.md and launch/README.md show is run here, read from those files.

A command is a line of a code block, or an inline code span, that starts with `jaxreplay`, `.venv/bin/...`,
`python`, `make` or `pip` followed by an argument. `HOW` maps each one, exactly as the docs spell it (a trailing
`# comment` dropped), to how it runs: the documented words with only the listed substitutions (placeholders such
as DIR and FILE, tiny sizes for `--config.KEY`, a tiny sweep file), in a temporary directory where `sweeps/`,
`launch/` and `benchmarks/` link to this checkout. A command added to the docs without a row, or a row whose
command left the docs, fails `test_every_documented_command_has_a_row`; a command that stops working fails the
test that runs it.
"""

import dataclasses
import importlib.util
import json
import lzma
import os
import re
import shlex
import sqlite3
import subprocess
import sys

import pytest

from jaxreplay.data import tokenfile, tokenizer

from test_launch import FAKE_GCLOUD, FAKE_SBATCH, calls, fake_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("launch", "README.md"))
COMMAND = re.compile(r"^(\.venv/bin/\S+|jaxreplay|python|make|pip)\s+\S")
TIMEOUT = 300


@dataclasses.dataclass(frozen=True)
class How:
  """group: the test that runs it; subs: documented word (or a flag's value) -> what runs instead; config:
  --config.KEY=VALUE set in place or added; same: a mention of a command run under another row."""
  group: str
  subs: dict = dataclasses.field(default_factory=dict)
  config: dict = dataclasses.field(default_factory=dict)
  same: str = ""


TINY_MODEL = {"model.d_model": 32, "model.n_layers": 1, "model.head_dim": 16, "model.seq_len": 32}
TINY_RUN = {"optim.batch_size": 4, "optim.warmup_tokens": 0, "stop.tokens": 640, "eval.tokens": 256,
            "eval.batch_size": 4, "log.progress": False}  # 5 steps of 4 rows of 32 tokens
PRETRAIN = (".venv/bin/jaxreplay pretrain --config=sweeps/quickstart.py:pretrain --config.model.d_model=256 "
            "--workdir=runs/en")
FINETUNE = (".venv/bin/jaxreplay finetune --config=sweeps/quickstart.py:finetune_kl --config.init.from=runs/en "
            "--workdir=runs/es_kl")
SWEEP_RUN = "jaxreplay sweep FILE --workdir=DIR --jobs=N"
TPU_WATCH = "python launch/tpu.py watch --mode=multihost ..."
TPU_BUCKET = ("python launch/tpu.py watch --mode=hosts --jobs=1 --name=sweep --zone=us-central2-b --accelerator=v4-32 "
              "--package='jaxreplay[gcs]' --sweep=sweeps/pretrain_length.py:small --workdir=gs://BUCKET/runs/tpp")
SWEEP_SUBS = {"FILE": "tiny_sweep.py", "DIR": "w", "N": "2", "NAME": "pretrain/seed=0"}

HOW = {
    # Make targets: `make -n` shows each recipe; what the recipe runs is checked in test_make_targets.
    "make quickstart": How("make"), "make test": How("make"), "make test-slow": How("make"), "make bench": How("make"),
    # The stages of the quickstart, tiny, on a stand-in of the default data (Genesis) in $JAXREPLAY_CACHE.
    PRETRAIN: How("stages", config={**TINY_MODEL, **TINY_RUN}),
    FINETUNE: How("stages", config={**TINY_RUN, "model.seq_len": 32, "replay.batch_size": 4, "replay.buffer": 1}),
    ".venv/bin/jaxreplay eval --workdir=runs/en --tasks=arc_easy,lambada_openai --limit=200":
        How("stages", subs={"arc_easy,lambada_openai": "my_task", "200": "2"}),  # and the tasks exist in lm-eval
    "jaxreplay data tokenize ...": How("stages", subs={"...": ["--tokenizer=cache/bible_v1024/tokenizer.json",
                                                             "--out=es_tokens", "--dataset_id=1", "es.txt"]}),
    # A tiny sweep, launched every documented way, then its status, report and lm-eval.
    "python launch/slurm.py FILE --workdir=DIR --submit": How("sweep", subs=SWEEP_SUBS),
    "python -m jaxreplay.experiments.runner worker --workdir=DIR --run=NAME": How("sweep", subs=SWEEP_SUBS),
    SWEEP_RUN: How("sweep", subs=SWEEP_SUBS),
    "jaxreplay sweep FILE --workdir=DIR --status": How("sweep", subs=SWEEP_SUBS),
    "jaxreplay sweep FILE --dry-run --target=v5e:2x2": How("dry_run", subs={"FILE": "tiny_sweep.py"}),
    ".venv/bin/jaxreplay report runs/tpp --out report/tpp": How("sweep", subs={"runs/tpp": "w"}),
    ".venv/bin/jaxreplay eval --workdir=DIR --tasks=my_task --include_path=my_tasks/":
        How("sweep", subs={"DIR": "w/runs/finetune/pretrain/seed=0/method=none"}),
    TPU_WATCH: How("tpu", subs={"...": ["--name=sw", "--zone=z", "--sweep=tiny_sweep.py", "--workdir=/mnt/w",
                                        "--package=jaxreplay", "--poll_s=0", "--down_when_done"]}),
    "python launch/tpu.py watch --mode=hosts --jobs=N ...": How("tpu", subs={"N": "2", "...": [
        "--name=sw", "--zone=z", "--sweep=tiny_sweep.py", "--workdir=/mnt/w", "--package=jaxreplay", "--poll_s=0",
        "--down_when_done"]}),
    # The pod recipe with a bucket (launch/README.md), against a fake gcloud: what each worker is told to run.
    TPU_BUCKET: How("tpu_bucket", subs={"--accelerator=v4-32": ["--accelerator=v4-32", "--poll_s=0",
                                                                "--down_when_done"]}),
    # Too long for CI at the documented size: what they would run, listed (`--dry-run`), or their `--help`.
    ".venv/bin/jaxreplay sweep sweeps/pretrain_length.py:small --workdir=runs/tpp --jobs=2": How("dry_run"),
    "jaxreplay --help": How("help"),
    "python launch/ray_sweep.py FILE --workdir=DIR --gpus=1": How("help"),  # tests/test_launch.py runs Ray
    **{f".venv/bin/python benchmarks/{b}.py": How("help")  # tests/test_benchmarks.py runs them at tiny sizes
       for b in ("train_throughput", "data_throughput", "sampling_throughput", "finetune_step_cost",
                 "checkpoint_overhead", "pack_throughput")},
    # The instruct experiment on its :small assets (a tiny random Llama made locally).
    "jaxreplay instruct --config=sweeps/instruct.py:small --workdir=DIR": How("instruct", subs={"DIR": "one"},
                                                                            config={"stop.steps": 2}),
    "jaxreplay sweep sweeps/instruct.py:small --workdir=runs/instruct": How("instruct"),
    # Extras to install: they must exist in pyproject.toml.
    "pip install -e '.[eval]'": How("extra"), "pip install 'jaxreplay[gcs]'": How("extra"), "pip install jaxreplay[ray]": How("extra"),
    # Mentions of a command that another row runs.
    "jaxreplay finetune": How("same", same=FINETUNE),
    "jaxreplay data": How("same", same="jaxreplay data tokenize ..."),
    "jaxreplay report": How("same", same=".venv/bin/jaxreplay report runs/tpp --out report/tpp"),
    "jaxreplay sweep --multihost": How("same", same=TPU_WATCH),  # its gcloud ssh line runs `sweep --multihost`
}


def documented_commands() -> dict:
  """{command: the doc that shows it}: code-block lines and inline code spans that start with a command."""
  out = {}
  for doc in DOCS:
    fenced, indented = False, False
    with open(os.path.join(ROOT, doc)) as f:
      lines = f.read().splitlines()
    for i, line in enumerate(lines):
      if line.startswith("```"):
        fenced = not fenced
        continue
      indented = line.startswith("    ") and not fenced and (indented or i == 0 or not lines[i - 1].strip())
      candidates = re.findall(r"`([^`]+)`", line)
      if fenced or indented:
        candidates.append(re.split(r"\s+#\s", line.strip())[0])
      out.update({c.strip(): doc for c in candidates if COMMAND.match(c.strip())})
  return out


def test_every_documented_command_has_a_row():
  documented = documented_commands()
  assert sorted(set(documented) - set(HOW)) == [], "commands in the docs that no row of HOW runs"
  assert sorted(set(HOW) - set(documented)) == [], "rows of HOW whose command is no longer in the docs"
  for command, how in HOW.items():
    assert not how.same or (HOW[how.same].group != "same"), command


def test_the_reader_finds_commands_in_every_kind_of_block(tmp_path, monkeypatch):
  doc = tmp_path / "README.md"
  doc.write_text("Run `jaxreplay sweep X --status` or `jaxreplay` itself.\n\n    python -m a.b worker  # note\n"
                 "```bash\nmake quickstart   # comment\n.venv/bin/python x.py\n```\n"
                 "```\ntree/   `make test-slow`\n```\n")
  monkeypatch.setattr(sys.modules[__name__], "DOCS", (str(doc),))
  assert documented_commands() == {c: str(doc) for c in ("jaxreplay sweep X --status", "python -m a.b worker",
                                                         "make quickstart", ".venv/bin/python x.py", "make test-slow")}


def argv_of(command: str) -> list:
  """The documented command's words, with its row's substitutions and config values, as run here."""
  how, out = HOW[command], []
  for word in shlex.split(command):
    flag, eq, value = word.partition("=")
    new = how.subs.get(word, how.subs.get(value) if eq else None)
    out += [word] if new is None else new if isinstance(new, list) else [f"{flag}={new}" if eq else new]
  for key, value in how.config.items():
    flag = f"--config.{key}="
    at = [i for i, w in enumerate(out) if w.startswith(flag)]
    out[at[0] if at else len(out):at[0] + 1 if at else len(out)] = [f"{flag}{value}"]  # in place: never twice
  if out[0] in (".venv/bin/jaxreplay", "jaxreplay"):
    return [sys.executable, "-m", "jaxreplay.cli", *out[1:]]
  return [sys.executable, *out[1:]] if out[0] in (".venv/bin/python", "python") else out


def test_argv_of_substitutes_words_values_and_config_keys():
  assert argv_of(PRETRAIN)[:4] == [sys.executable, "-m", "jaxreplay.cli", "pretrain"]
  pretrain = argv_of(PRETRAIN)
  assert pretrain.count("--config.model.d_model=32") == 1 and "--config.model.d_model=256" not in pretrain
  assert argv_of(SWEEP_RUN)[3:] == ["sweep", "tiny_sweep.py", "--workdir=w", "--jobs=2"]
  assert argv_of(TPU_WATCH)[1:4] == ["launch/tpu.py", "watch", "--mode=multihost"] and "--zone=z" in argv_of(TPU_WATCH)


def env_for(workspace, **extra):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             JAXREPLAY_CACHE=str(workspace / "cache"))
  env.update(extra)
  return env


def start(command, cwd, env, extra=()):
  return subprocess.Popen(argv_of(command) + list(extra), cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(command, cwd, env, extra=()) -> str:
  """Runs a documented command to its end; its output, after checking that it succeeded."""
  out, _ = (p := start(command, cwd, env, extra)).communicate(timeout=TIMEOUT)
  assert p.returncode == 0, f"`{command}` ({shlex.join(argv_of(command) + list(extra))}) failed:\n{out[-3000:]}"
  return out


def commands(group):
  return [c for c, how in HOW.items() if how.group == group]


@pytest.fixture
def workspace(tmp_path):
  """A directory to run commands from, as a user's checkout: sweeps/, launch/ and benchmarks/ are this one's."""
  for name in ("sweeps", "launch", "benchmarks"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  return tmp_path


def genesis(lang):
  with lzma.open(os.path.join(ROOT, "tests", "fixtures", f"genesis_{lang}.txt.xz"), "rt") as f:
    return f.read().splitlines()


def genesis_token_dirs(root, vocab_size):
  """root/{en,es}: Genesis in English (dataset id 0) and Spanish (1), with one tokenizer trained on both."""
  tok = str(root / tokenizer.TOKENIZER_FILE)
  texts = {"en": genesis("en_kjv"), "es": genesis("es_rv1909")}
  tokenizer.train_tokenizer(texts["en"] + texts["es"], vocab_size, tok)
  for dataset_id, lang in enumerate(texts):
    tokenfile.write_token_dir(str(root / lang), texts[lang], tok, dataset_id=dataset_id,
                              is_valid=tokenfile.every_kth(0.05), progress=False)
  return str(root / "en"), str(root / "es")


def default_data_stand_in(cache):
  """`default:en:1024` / `default:es:1024` in the cache, built from Genesis alone: the real pair takes minutes."""
  genesis_token_dirs(cache / "bible_v1024", 1024)


def write_task(directory, name):
  """A local lm-eval task of three multiple-choice questions (jaxreplay eval --include_path)."""
  directory.mkdir(exist_ok=True)
  items = [dict(q="In the beginning God created the", choices=["heaven", "light"], answer=0),
           dict(q="And God said, Let there be", choices=["form", "light"], answer=1),
           dict(q="And the earth was without", choices=["form", "good"], answer=0)]
  (directory / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
  spec = dict(task=name, dataset_path="json", dataset_kwargs=dict(data_files=dict(test=str(directory / "items.jsonl"))),
              test_split="test", output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}",
              doc_to_target="{{answer}}", metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True)])
  (directory / f"{name}.yaml").write_text(json.dumps(spec))


def final(workdir):
  with open(os.path.join(workdir, "final.json")) as f:
    return json.load(f)


def test_quickstart_stages_tokenize_and_eval(workspace):
  pytest.importorskip("lm_eval", reason="jaxreplay eval needs the eval extra")
  default_data_stand_in(workspace / "cache")
  env = env_for(workspace)
  (workspace / "es.txt").write_text("\n".join(genesis("es_rv1909")[:200]) + "\n")
  write_task(workspace / "my_tasks", "my_task")
  pre, ft, ev, tokenize = commands("stages")
  out = run(tokenize, workspace, env)
  meta = tokenfile.open_token_dir(str(workspace / "es_tokens")).meta
  assert meta["documents"] == 200 and meta["dataset_id"] == 1 and "es_tokens" in out
  run(pre, workspace, env)
  assert final(workspace / "runs/en")["step"] == 5
  with open(workspace / "runs/en/config.json") as f:
    assert json.load(f)["model"]["d_model"] == 32
  run(ft, workspace, env)
  result = final(workspace / "runs/es_kl")
  assert result["step"] == 5 and "prev_ntp_delta" in result  # forgetting: English loss after Spanish finetuning
  out = run(ev, workspace, env, ["--include_path=my_tasks"])
  assert "my_task: acc=" in out and os.path.isfile(workspace / "runs/en/lm_eval.json")
  assert harness_tasks({"arc_easy", "lambada_openai"}) == {"arc_easy", "lambada_openai"}  # the documented ones


def harness_tasks(names) -> set:
  """Which of `names` lm-eval defines (a `task: NAME` line in its task YAML files; read, not imported)."""
  tasks = os.path.join(os.path.dirname(importlib.util.find_spec("lm_eval").origin), "tasks")
  found = set()
  for folder, _, files in os.walk(tasks):
    for n in files:
      if n.endswith(".yaml"):
        with open(os.path.join(folder, n)) as f:
          found |= {m for m in re.findall(r"^task: (\S+)$", f.read(), re.M) if m in names}
  return found


TINY_SWEEP = """
from jaxreplay import config
from jaxreplay.experiments import sweeps

def tiny(data):
  c = config.default()
  c.model.update(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=300)
  c.data.path = data
  c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=0)
  c.eval.update(every_tokens=10_000, tokens=256, batch_size=8)
  c.checkpoint.update(every_minutes=0.0, async_save=False)
  c.log.update(every_steps=5, progress=False)
  c.stop.steps = 6
  return c

def get_sweep(arg=""):
  s = sweeps.Sweep("a tiny sweep for the documented commands")
  s.stage("pretrain", tiny({a!r}), {{"seed": [0]}})
  s.stage("finetune", tiny({b!r}), {{"replay.method": ["none", "ntp"]}}, after="pretrain")
  return s
"""


def test_a_sweep_launched_every_documented_way(workspace):
  """slurm.py records the sweep and writes its arrays; workers train runs by name and by level; the runner
  trains the rest; --status, report and eval read the finished sweep."""
  pytest.importorskip("lm_eval", reason="jaxreplay eval needs the eval extra")
  a, b = genesis_token_dirs(workspace / "data", 300)
  (workspace / "tiny_sweep.py").write_text(TINY_SWEEP.format(a=a, b=b))
  write_task(workspace / "my_tasks", "my_task")
  env, log, _ = fake_bin(workspace, "sbatch", FAKE_SBATCH)
  env = env_for(workspace, **{k: env[k] for k in ("PATH", "FAKE_LOG", "FAKE_STATE")})
  slurm, worker, sweep, status, report, ev = commands("sweep")
  run(slurm, workspace, env)
  assert [c[0] for c in calls(log)] == ["--parsable", "--parsable"]  # one array per level, the second after the first
  run(worker, workspace, env)
  assert final(workspace / "w/runs/pretrain/seed=0")["step"] == 6
  level = [w.replace("--run=pretrain/seed=0", "--level=1") for w in argv_of(worker)] + ["--index=0"]
  r = subprocess.run(level, cwd=workspace, env=env, timeout=TIMEOUT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr  # the `# or --level=K --index=I` form
  run(sweep, workspace, env)
  db = sqlite3.connect(workspace / "w/results.sqlite")
  names = {n for (n,) in db.execute("SELECT name FROM results")}
  db.close()
  assert names == {"pretrain/seed=0", "finetune/pretrain/seed=0/method=none", "finetune/pretrain/seed=0/method=ntp"}
  out = run(status, workspace, env)
  rows = [line.split() for line in out.splitlines()]
  states = {row[0]: row[1] for row in rows if row and row[0] in names}
  assert states == dict.fromkeys(names, "done"), out
  out = run(report, workspace, env)
  assert os.listdir(workspace / "report/tpp") and all(os.path.exists(workspace / p) for p in out.split())
  out = run(ev, workspace, env)
  assert "my_task: acc=" in out and "sweep table: " in out


def test_tpu_watch_modes(workspace):
  """`watch` against a fake gcloud: creates the slice, installs, starts the sweep on every worker, polls, ends."""
  (workspace / "tiny_sweep.py").write_text("")
  for command, want in zip(commands("tpu"), ("--multihost", "--jobs=2"), strict=True):
    (workspace / want).mkdir()
    env, log, state = fake_bin(workspace / want, "gcloud", FAKE_GCLOUD)
    state.write_text(json.dumps(dict(qr="", node="", status=["0 done of 3 runs", "3 done of 3 runs"])))
    out = run(command, workspace, env_for(workspace, **{k: env[k] for k in ("PATH", "FAKE_LOG", "FAKE_STATE")}))
    ssh = [c for c in calls(log) if c[2:4] == ["tpu-vm", "ssh"] and "--worker=all" in c]
    assert "finished" in out and any(f"sweep tiny_sweep.py --workdir=/mnt/w {want}" in c[6] for c in ssh), calls(log)


def test_tpu_pod_with_a_bucket(workspace):
  """The bucket recipe against a fake gcloud: every worker installs the gcs extra, mounts nothing, and runs an
  independent runner on the gs:// workdir itself."""
  (command,) = commands("tpu_bucket")
  env, log, state = fake_bin(workspace, "gcloud", FAKE_GCLOUD)
  state.write_text(json.dumps(dict(qr="", node="", status=["0 done of 3 runs", "3 done of 3 runs"])))
  out = run(command, workspace, env_for(workspace, **{k: env[k] for k in ("PATH", "FAKE_LOG", "FAKE_STATE")}))
  ssh = [" ".join(c) for c in calls(log) if c[2:4] == ["tpu-vm", "ssh"] and "--worker=all" in c]
  assert "finished" in out and any("jaxreplay[gcs]" in c for c in ssh), ssh
  assert any("sweep sweeps/pretrain_length.py:small --workdir=gs://BUCKET/runs/tpp --jobs=1" in c for c in ssh), ssh
  assert not os.path.exists(workspace / "gs:")


def test_dry_runs_and_help(workspace):
  (workspace / "tiny_sweep.py").write_text(TINY_SWEEP.format(a="a", b="b"))  # compiled for a TPU, no data read
  env = env_for(workspace)
  procs = [(c, start(c, workspace, env, ["--dry-run"])) for c in commands("dry_run")]
  procs += [(c, start(c, workspace, env, [] if "--help" in c else ["--help"])) for c in commands("help")]
  for command, p in procs:
    out, _ = p.communicate(timeout=TIMEOUT)
    want = "runs in dependency order" if HOW[command].group == "dry_run" else "usage:"
    assert p.returncode == 0 and want in out, f"`{command}`:\n{out[-2000:]}"
  assert not os.path.exists(workspace / "runs"), "a dry run wrote something"


def test_instruct(workspace):
  pytest.importorskip("torch", reason="the tiny Llama checkpoint is made with torch")
  pytest.importorskip("transformers", reason="checkpoints and chat templates need transformers")
  env = env_for(workspace)
  one, sweep = commands("instruct")
  run(one, workspace, env)
  result = final(workspace / "one")
  assert result["step"] == 2, result
  out = run(sweep, workspace, env, ["--dry-run"])
  assert "instruct/method=kl,src=self,coeff=1" in out


def test_make_targets(workspace):
  """`make -n` shows each documented target's recipe; the quickstart's command takes its flags."""
  recipes = {"quickstart": "jaxreplay quickstart --workdir=runs/quickstart", "test": "pytest",
             "test-slow": "pytest -q -m slow", "bench": "benchmarks/suite.py"}
  for command in commands("make"):
    target = command.split()[1]
    r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and recipes[target] in r.stdout, (command, r.stdout + r.stderr)
    if target == "quickstart":  # it trains for minutes: tests/test_quickstart.py runs it tiny, in process
      line = next(x for x in r.stdout.splitlines() if recipes[target] in x)
      argv = [sys.executable, "-m", "jaxreplay.cli", *shlex.split(line)[1:], "--help"]
      q = subprocess.run(argv, cwd=workspace, env=env_for(workspace), capture_output=True, text=True, timeout=TIMEOUT)
      assert q.returncode == 0 and "--scale" in q.stdout, q.stdout + q.stderr


def test_extras_exist():
  tomllib = pytest.importorskip("tomllib")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  for command in commands("extra"):
    name, extra = re.search(r"([\w.-]+)\[(\w+)\]", command).groups()
    assert extra in project["optional-dependencies"] and name in (".", project["name"]), command


def test_readme_layout_names_every_module_of_the_tree():
  """The README's Layout block, as written from the tree: every top-level folder of the repository, every
  top-level module of jaxreplay/, and every module of each of its packages on that package's lines."""
  with open(os.path.join(ROOT, "README.md")) as f:
    block = f.read().split("## Layout", 1)[1].split("```")[1].splitlines()
  folders, modules, packages, package = set(), set(), {}, None
  for line in block:
    if re.match(r"^\w+/", line):
      folders.add(line.split()[0])
    elif re.match(r"^  \w+\.py", line):
      modules |= set(re.findall(r"(\w+)\.py", line.split("   ")[0]))
    package = re.match(r"^  (\w+)/", line).group(1) if re.match(r"^  \w+/", line) else package
    if package and line.startswith("  "):
      packages.setdefault(package, set()).update(re.findall(r"\w+", line))
  missing = []
  for name in sorted(os.listdir(os.path.join(ROOT, "jaxreplay"))):
    path = os.path.join(ROOT, "jaxreplay", name)
    if os.path.isfile(os.path.join(path, "__init__.py")):
      inside = {n[:-3] for n in os.listdir(path) if n.endswith(".py") and n != "__init__.py"}
      missing += [f"jaxreplay/{name}/{m}.py" for m in sorted(inside - packages.get(name, set()))]
    elif name.endswith(".py") and name != "__init__.py" and name[:-3] not in modules:
      missing.append(f"jaxreplay/{name}")
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  missing += sorted({p.split("/")[0] + "/" for p in tracked if "/" in p and not p.startswith(".")} - folders)
  assert not missing, "missing from the README's Layout: " + ", ".join(missing)


REPO_PATH = r"\b(?:jaxreplay|sweeps|benchmarks|launch|docs|tests)/[\w./-]*\w\.(?:py|md|sh|png)\b"


def test_every_path_the_docs_name_exists():
  """A module that moves takes its mentions along: every repository path that the docs (and pyproject.toml's
  comments) name exists."""
  texts = [os.path.join(ROOT, p) for p in (*DOCS, "pyproject.toml")]
  texts += [os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")]
  missing = []
  for path in texts:
    with open(path) as f:
      named = set(re.findall(REPO_PATH, f.read()))
    missing += [f"{os.path.relpath(path, ROOT)} names {p}" for p in sorted(named)
                if not os.path.exists(os.path.join(ROOT, p))]
  assert not missing, "\n".join(missing)
