"""jaxreplay.io: a reader sees the old file or the new one whole, an error keeps the old one, and writers at
once (threads of one process, or processes) never share a tmp name or leave a torn file."""

import json
import multiprocessing
import os
import threading

import pytest

from jaxreplay import io


def test_writes_land_whole_and_leave_no_tmp_file(tmp_path):
  io.write_json(str(tmp_path / "a.json"), {"x": [1, 2]}, sort_keys=True)
  io.write_text(str(tmp_path / "b.txt"), "héllo\n")
  with io.atomic_open(str(tmp_path / "c.bin"), "wb") as f:
    f.write(b"\x00\xff")
  with io.atomic_open(str(tmp_path / "d.txt")) as f:
    f.write("one\n")
    f.write("two\n")
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
  assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
  assert (tmp_path / "c.bin").read_bytes() == b"\x00\xff"
  assert (tmp_path / "d.txt").read_text() == "one\ntwo\n"
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt", "c.bin", "d.txt"]


def test_an_error_keeps_the_old_file_and_removes_the_tmp_file(tmp_path):
  path = str(tmp_path / "f.json")
  io.write_json(path, {"old": True})
  with pytest.raises(RuntimeError):
    with io.atomic_open(path) as f:
      f.write('{"new": ')
      raise RuntimeError("interrupted")
  with pytest.raises(TypeError):
    io.write_json(path, {"new": object()})  # not JSON: fails before anything is written
  assert json.loads(open(path).read()) == {"old": True}
  assert os.listdir(tmp_path) == ["f.json"]
  with pytest.raises(ValueError, match="mode must be"):
    with io.atomic_open(path, "a"):
      pass


def test_tmp_names_are_unique_within_a_process_and_beside_the_target(tmp_path):
  path = str(tmp_path / "x")
  names = {io.tmp_name(path) for _ in range(1000)}
  assert len(names) == 1000
  assert all(os.path.dirname(n) == str(tmp_path) and os.path.basename(n).startswith("x.tmp.") for n in names)


def _write_many(path: str, content: bytes, n: int, names_out=None):
  for _ in range(n):
    if names_out is not None:
      names_out.append(io.tmp_name(path))
    with io.atomic_open(path, "wb", fsync=False) as f:
      f.write(content)


def _check_reads(path: str, allowed: set, stop: threading.Event) -> list:
  bad = []
  while not stop.is_set():
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      continue
    if data not in allowed:
      bad.append(len(data))
  return bad


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_two_writers_at_once_never_leave_a_torn_file(tmp_path, kind):
  path = str(tmp_path / "shared.bin")
  a, b = b"a" * 300_000, b"b" * 200_000  # large enough that a plain write would be seen half done
  stop, bad = threading.Event(), []
  reader = threading.Thread(target=lambda: bad.extend(_check_reads(path, {a, b}, stop)))
  reader.start()
  if kind == "threads":  # one pid: only the random part keeps the tmp names apart
    writers = [threading.Thread(target=_write_many, args=(path, c, 60)) for c in (a, b)]
  else:
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(path, c, 60)) for c in (a, b)]
  for w in writers:
    w.start()
  for w in writers:
    w.join()
  stop.set()
  reader.join()
  assert kind == "threads" or all(w.exitcode == 0 for w in writers)
  assert not bad, f"torn reads of {bad[:5]} bytes"
  assert open(path, "rb").read() in (a, b)
  assert os.listdir(tmp_path) == ["shared.bin"]  # every tmp file was renamed onto the target


def test_writer_threads_never_share_a_tmp_name(tmp_path):
  names = [[], []]
  writers = [threading.Thread(target=_write_many, args=(str(tmp_path / "s"), b"x", 200, names[i])) for i in (0, 1)]
  for w in writers:
    w.start()
  for w in writers:
    w.join()
  assert len(set(names[0]) | set(names[1])) == 400


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
  target = str(tmp_path / "d")
  with io.atomic_dir(target) as tmp:
    open(os.path.join(tmp, "old.txt"), "w").write("old")
  with pytest.raises(RuntimeError):
    with io.atomic_dir(target) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("half")
      raise RuntimeError("interrupted build")
  assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["d"]
  with io.atomic_dir(target) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["d"]
