"""Works from a wheel: the package built with `pip wheel`, installed (not editable) into a fresh venv, runs the
documented commands from another directory, reading the experiment files it ships (jaxreplay/sweeps)."""

import os
import site
import subprocess
import sys
import tomllib

import pytest

from test_entrance import default_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_lists_every_package():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, names in os.walk(os.path.join(ROOT, "jaxreplay"))
           if "__init__.py" in names}
  assert listed == found | {"jaxreplay.sweeps"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A venv holding only the wheel; the dependencies come from this interpreter's site-packages (read as a plain
  path, so its editable install of the checkout is not seen)."""
  d = tmp_path_factory.mktemp("wheel")
  src = d / "src"
  src.mkdir()
  for name in ("jaxreplay", "sweeps", "pyproject.toml", "README.md"):  # a clean copy: the build writes into it
    (subprocess.run(["cp", "-r", os.path.join(ROOT, name), str(src)], check=True))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(d / "dist"), str(src)], check=True, capture_output=True)
  wheel = next((d / "dist").iterdir())
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "venv")], check=True)
  python = d / "venv" / "bin" / "python"
  purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(purelib, "deps.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                 check=True, capture_output=True)
  return d / "venv"


def jaxreplay(venv, args, cwd):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXREPLAY_CACHE")}
  env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", JAX_PLATFORMS="cpu")
  r = subprocess.run(["jaxreplay", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, f"jaxreplay {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
  return r.stdout


def test_the_installed_package_is_the_wheel(venv, tmp_path):
  out = subprocess.run([str(venv / "bin" / "python"), "-c", "import jaxreplay.experiments.resolve as r; "
                        "print(r.__file__); print(r.SWEEPS_DIR)"], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=True).stdout.split()
  assert all(p.startswith(str(venv)) for p in out), out
  assert os.path.isfile(os.path.join(out[1], "instruct.py")) and os.path.isfile(os.path.join(out[1], "_paper.py"))
  assert ":small" in jaxreplay(venv, ["sweep", "sweeps/toy_continual.py", "--variants"], tmp_path)  # as the README names it


@pytest.mark.slow  # trains three quickstart runs, an instruct run and a toy sweep: minutes on a 2-core CPU
def test_documented_commands_run_from_the_wheel_in_another_directory(venv, tmp_path):
  cache = default_cache(tmp_path / "cache", vocab=1024, train_tokens=300_000, valid_tokens=70_000)
  out = jaxreplay(venv, ["quickstart", "--workdir=qs", "--scale=0.1", f"--cache_dir={cache}"], tmp_path)
  assert "matched Spanish loss" in out and (tmp_path / "qs" / "quickstart.json").exists()
  jaxreplay(venv, ["instruct", "--config=sweeps/instruct.py:small", "--workdir=one"], tmp_path)
  assert (tmp_path / "one" / "final.json").exists()
  jaxreplay(venv, ["sweep", "sweeps/toy_continual.py:small", "--workdir=toy"], tmp_path)
  status = jaxreplay(venv, ["sweep", "sweeps/toy_continual.py:small", "--workdir=toy", "--status"], tmp_path)
  assert "pending" not in status and "done" in status
