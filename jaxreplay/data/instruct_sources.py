"""Builds the instruct experiment's local files from Hugging Face datasets (needs the hub and `datasets`).

  python -m jaxreplay.data.instruct_sources pyranet data/pyranet      # train.jsonl, valid.jsonl (description → code)
  python -m jaxreplay.data.instruct_sources dclm data/dclm.jsonl       # real replay text ({"text"}), 200M tokens' worth
  python -m jaxreplay.data.instruct_sources mcq data/mcq               # mmlu / arc_challenge / commonsense_qa .jsonl

The converters are pure functions over dataset rows; `build_*` load the hub datasets (tested with the real
`datasets` library on local directories of the same names, tests/test_hf_datasets.py).
PyraNet filters follow the paper: compile_status "No error!", description ≥ 16 characters, code containing
`module` and `endmodule`. Its `description` column holds a dict-like string whose "description" is the text.
"""

from __future__ import annotations

import ast
import json
import os
import sys

import numpy as np

from jaxreplay.io import atomic_open

LETTERS = "ABCDEFGHIJ"


def pyranet_example(row: dict) -> dict | None:
  """{prompt, response} of one PyraNet row, or None when the paper's filters drop it."""
  meta = row.get("description")
  if isinstance(meta, str):
    try:
      meta = ast.literal_eval(meta)
    except (ValueError, SyntaxError):
      meta = {"description": meta}
  meta = meta or {}
  desc, code = str(meta.get("description", "")).strip(), str(row.get("code", ""))
  status = str(meta.get("compile_status", row.get("compile_status", "")))
  if not status.startswith("No error") or len(desc) < 16 or "module" not in code or "endmodule" not in code:
    return None
  return dict(prompt=desc, response=code)


def mcq_item(row: dict, kind: str) -> dict:
  """{question, choices, answer} from an MMLU (cais/mmlu), ARC (allenai/ai2_arc) or CSQA (tau/commonsense_qa) row."""
  if kind == "mmlu":
    return dict(question=row["question"], choices=list(row["choices"]), answer=int(row["answer"]))
  labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
  return dict(question=row["question"], choices=texts, answer=labels.index(row["answerKey"]))


def _write(path, rows):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  n = 0
  with atomic_open(path) as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
      n += 1
  return n


def build_pyranet(out_dir: str, valid_examples: int = 20_000, seed: int = 0):
  """~20M held-out tokens in the paper; 20,000 examples here (set valid_examples to match your tokenizer)."""
  import datasets  # lazy: the optional `hf` extra
  ds = datasets.load_dataset("bnadimi/PyraNet-Verilog", split="train")
  examples = [e for e in map(pyranet_example, ds) if e is not None]
  order = np.random.default_rng(seed).permutation(len(examples))
  valid = [examples[i] for i in order[:valid_examples]]
  train = [examples[i] for i in order[valid_examples:]]
  return _write(os.path.join(out_dir, "train.jsonl"), train), _write(os.path.join(out_dir, "valid.jsonl"), valid)


def build_dclm(path: str, max_chars: int = 800_000_000):
  """Streams dolmino-mix-1124's dclm subset into {"text"} lines until ~max_chars (≈ 4 characters a token)."""
  import datasets  # lazy: the optional `hf` extra
  ds = datasets.load_dataset("allenai/dolmino-mix-1124", "dclm", split="train", streaming=True)

  def rows():
    total = 0
    for r in ds:
      yield {"text": r["text"]}
      total += len(r["text"])
      if total >= max_chars:
        return
  return _write(path, rows())


def build_mcq(out_dir: str, seed: int = 42):
  """MMLU test (first 2,048 after a seed-42 shuffle), ARC-Challenge test (1,024), CommonsenseQA validation (1,024)."""
  import datasets  # lazy: the optional `hf` extra
  specs = [("mmlu", ("cais/mmlu", "all", "test"), 2048),
           ("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge", "test"), 1024),
           ("commonsense_qa", ("tau/commonsense_qa", None, "validation"), 1024)]
  out = {}
  for name, (repo, sub, split), n in specs:
    ds = datasets.load_dataset(repo, sub, split=split).shuffle(seed=seed)
    kind = "mmlu" if name == "mmlu" else "keyed"
    rows = (mcq_item(r, kind) for r in ds.select(range(min(n, len(ds)))))
    out[name] = _write(os.path.join(out_dir, f"{name}.jsonl"), rows)
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  builders = dict(pyranet=build_pyranet, dclm=build_dclm, mcq=build_mcq)
  if len(argv) != 2 or argv[0] not in builders:
    print(__doc__, file=sys.stderr)
    return 2
  print(builders[argv[0]](argv[1]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
