"""The chat data's token cache when two jobs of a sweep build it at once."""
import io
import os
import pickle
import threading

from jaxreplay.data import chat as chat_data


def test_two_jobs_writing_one_token_cache_at_once_leave_it_whole(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  (model / "tokenizer.json").write_text("{}")
  chats = tmp_path / "chats.jsonl"
  chats.write_text("{}\n")
  started, go = threading.Event(), threading.Event()

  class PauseWhilePickled:
    """Holds job A's write open halfway (its first 64 KB frame already on disk) while job B writes."""
    def __reduce__(self):
      started.set()
      go.wait(timeout=60)
      return (str, ("a",))

  first = list(range(50_000))  # bigger than pickle's frame: written before the pause
  got = {}
  job_a = threading.Thread(target=lambda: got.update(a=chat_data.cached(
      "", "chat", [str(chats)], str(model), lambda: [first, PauseWhilePickled(), first])))
  job_a.start()
  assert started.wait(timeout=60)
  got["b"] = chat_data.cached("", "chat", [str(chats)], str(model), lambda: [list(range(300_000)), "b"])
  go.set()
  job_a.join(timeout=60)
  caches = [f for f in os.listdir(tmp_path) if f.startswith(".jaxreplay-chat-")]
  assert len(caches) == 1 and caches[0].endswith(".pkl"), caches  # no temporary file left behind
  with open(tmp_path / caches[0], "rb") as f:
    data = f.read()
  a, b = [first, "a", first], [list(range(300_000)), "b"]
  # Exactly one job's whole pickle and nothing after it: a shared .tmp name leaves the longer write's tail
  # behind the shorter one, or mixes the two when their writes interleave.
  stream = io.BytesIO(data)
  on_disk = pickle.Unpickler(stream).load()
  assert on_disk in (a, b) and stream.tell() == len(data), (stream.tell(), len(data))
  assert got["b"] == [list(range(300_000)), "b"] and got["a"][0] == first
  assert chat_data.cached("", "chat", [str(chats)], str(model), lambda: 1 / 0) == on_disk  # later runs read it, not build
