"""Loader throughput in tokens/s at the quickstart and paper batch shapes; prints JSON.

The train step consumes roughly 10–50k tokens/s on a 2-core CPU, so the loader must deliver at least
500k tokens/s (10× the fast end) for the step never to wait on data.

  python benchmarks/data_throughput.py [--tokens=20000000] [--seconds=2]
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from jaxreplay.data import TrainBatches, open_token_dir, train_tokenizer, write_token_dir
from jaxreplay.data.corpora import read_text_files, shared_corpora_dir

REQUIRED = 10 * 50_000


def make_dir(path: str, tokens: int, vocab_size: int, dataset_id: int) -> str:
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(dataset_id)
  rng.integers(11, vocab_size, tokens, dtype=np.uint16).tofile(os.path.join(path, "train.bin"))
  rng.integers(11, vocab_size, 1 << 16, dtype=np.uint16).tofile(os.path.join(path, "valid.bin"))
  meta = dict(vocab_size=vocab_size, dtype="uint16", tokenizer_hash="0" * 64, dataset_id=dataset_id,
              name="bench", train_tokens=tokens, valid_tokens=1 << 16, sources=[], valid_documents={}, eos_id=10)
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f)
  return path


def rate(fn, seconds: float) -> float:
  """Tokens per second of fn() (which returns tokens produced), over at least `seconds`."""
  fn()  # warm up: first epoch keys, page cache
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += fn()
  return n / (time.perf_counter() - t0)


def tokenize_rate(tmp: str, lines: int = 30_000) -> dict:
  """Tokenizing speed (text MB/s) of write_token_dir on real English documentation, when available."""
  corpora = shared_corpora_dir()
  if corpora is None:
    return {}
  docs = list(read_text_files([os.path.join(corpora, "en_docs.txt.xz")]))[:lines]
  tok = os.path.join(tmp, "tok.json")
  train_tokenizer(docs[:10_000], 4096, tok)
  t0 = time.perf_counter()
  meta = write_token_dir(os.path.join(tmp, "docs"), docs, tok, dataset_id=0, progress=False)
  dt = time.perf_counter() - t0
  mb = sum(len(d.encode()) for d in docs) / 1e6
  return dict(tokenize_text_mb_per_s=round(mb / dt, 2), tokenize_tokens_per_s=round(meta["train_tokens"] / dt))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=20_000_000)
  p.add_argument("--seconds", type=float, default=2.0)
  a = p.parse_args()
  results = dict(required_tokens_per_s=REQUIRED, file_tokens=a.tokens, cases=[])
  with tempfile.TemporaryDirectory() as tmp:
    main_dir = make_dir(os.path.join(tmp, "en"), a.tokens, 4096, 0)
    mix_dir = make_dir(os.path.join(tmp, "es"), a.tokens // 4, 4096, 1)
    t0 = time.perf_counter()
    open_token_dir(main_dir, 4096, 256)
    results["open_and_check_s"] = round(time.perf_counter() - t0, 3)
    for B, T, mix, procs in ((32, 128, None, 1), (256, 256, None, 1), (256, 256, (mix_dir, 0.25, -1), 1),
                             (256, 256, None, 2)):
      tb = TrainBatches(main_dir, T, B, seed=0, mix=mix, process_count=procs, prefetch=2)
      step = iter(range(1 << 40))
      direct = rate(lambda: tb.batch(next(step)).size, a.seconds)
      it = tb.iterate(0)
      prefetched = rate(lambda: next(it)[1].size, a.seconds)
      results["cases"].append(dict(batch=B, seq_len=T, mix_fraction=mix[1] if mix else 0.0, process_count=procs,
                                   direct_tokens_per_s=round(direct), iterate_tokens_per_s=round(prefetched),
                                   ok=min(direct, prefetched) >= REQUIRED))
    results.update(tokenize_rate(tmp))
  results["ok"] = all(c["ok"] for c in results["cases"])
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
