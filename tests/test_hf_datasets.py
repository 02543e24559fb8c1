"""The `hf:` input and the instruct data builders, run through the real `datasets` library on local data.

Hub-style names ("org/name") resolve to a local directory of that name first, so the builders that name
hub datasets read files written here; the hub is never contacted (HF_HUB_OFFLINE).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402  (the test extra installs it; no stand-in)
import pytest  # noqa: E402

from jaxreplay.data import instruct_sources as instruct_data  # noqa: E402
from jaxreplay.data import DataError, commands, corpora, open_token_dir, train_tokenizer  # noqa: E402


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def configs_readme(directory, configs):
  """A dataset card whose YAML maps config names and splits to files (how the hub declares subsets)."""
  lines = ["---", "configs:"]
  for name, splits in configs.items():
    lines += [f"- config_name: {name}", "  data_files:"]
    lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
  with open(os.path.join(directory, "README.md"), "w") as f:
    f.write("\n".join(lines + ["---", ""]))


@pytest.fixture
def offline(monkeypatch, tmp_path):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.chdir(tmp_path)
  return tmp_path


def test_local_jsonl_file_streams_its_text_field(offline):
  write_jsonl("pages.jsonl", [{"text": "a page"}, {"text": "  "}, {"text": "another"}, {"text": "third"}])
  assert list(corpora.hf_documents("pages.jsonl", limit=2)) == ["a page", "another"]
  write_jsonl("other.jsonl", [{"content": "a page"}])
  with pytest.raises(DataError, match="no field 'text'"):
    list(corpora.hf_documents("other.jsonl"))


def test_hub_name_config_and_split_resolve_through_the_library(offline):
  """hf:PATH:NAME:SPLIT picks the config and split the dataset card declares, as on the hub."""
  write_jsonl("org/pages/en/train.jsonl", [{"text": "en train"}])
  write_jsonl("org/pages/en/validation.jsonl", [{"text": "en valid one"}, {"text": "en valid two"}])
  write_jsonl("org/pages/es/train.jsonl", [{"text": "es train"}])
  configs_readme("org/pages", {"en": {"train": "en/train.jsonl", "validation": "en/validation.jsonl"},
                               "es": {"train": "es/train.jsonl"}})
  docs, sources, group = commands.documents(["hf:org/pages:en:validation"])
  assert list(docs) == ["en valid one", "en valid two"] and sources == ["hf:org/pages:en:validation"]
  assert group == 1
  assert list(commands.documents(["hf:org/pages:es"])[0]) == ["es train"]  # the split defaults to train
  with pytest.raises(DataError, match=r"Could not open Hugging Face dataset 'org/pages' \(name='fr'"):
    list(corpora.hf_documents("org/pages", "fr"))


def test_tokenize_an_hf_input_into_a_token_directory(offline):
  texts = [f"document number {i} says something" for i in range(40)]
  write_jsonl("org/docs/train.jsonl", [{"text": t} for t in texts])
  tok = str(offline / "tok.json")
  train_tokenizer(texts, 300, tok)
  meta = commands.cmd_tokenize(["hf:org/docs"], tok, str(offline / "out"), dataset_id=2, valid_fraction=0.1,
                               progress=False)
  assert meta["documents"] == 40 and meta["valid_documents"]["count"] == 4
  assert open_token_dir(str(offline / "out"), 300, 8).meta["sources"] == ["hf:org/docs"]


def test_a_missing_dataset_is_one_sentence(offline):
  with pytest.raises(DataError, match=r"^Could not open Hugging Face dataset '/no/such/dir'.*: \w+"):
    list(corpora.hf_documents("/no/such/dir"))


def test_instruct_builders_read_the_real_library(offline):
  """build_pyranet / build_mcq over local directories named as the hub datasets they load."""
  good = dict(code="module m; endmodule", description=str(dict(description="A module that does nothing at all",
                                                                   compile_status="No error!")))
  bad = dict(code="module m; endmodule", description=str(dict(description="short", compile_status="No error!")))
  write_jsonl("bnadimi/PyraNet-Verilog/train.jsonl", [good] * 5 + [bad])
  assert instruct_data.build_pyranet(str(offline / "pyranet"), valid_examples=2) == (3, 2)
  row = json.loads(open(offline / "pyranet" / "valid.jsonl").readline())
  assert row == dict(prompt="A module that does nothing at all", response="module m; endmodule")

  mmlu = [dict(question=f"q{i}", choices=["a", "b", "c", "d"], answer=i % 4) for i in range(6)]
  write_jsonl("cais/mmlu/all/test.jsonl", mmlu)
  configs_readme("cais/mmlu", {"all": {"test": "all/test.jsonl"}})
  arc = [dict(question=f"arc{i}", choices=dict(label=["A", "B", "C"], text=["x", "y", "z"]), answerKey="C")
         for i in range(3)]
  write_jsonl("allenai/ai2_arc/ARC-Challenge/test.jsonl", arc)
  configs_readme("allenai/ai2_arc", {"ARC-Challenge": {"test": "ARC-Challenge/test.jsonl"}})
  csqa = [dict(question="cs", choices=dict(label=["A", "B"], text=["p", "q"]), answerKey="A")]
  write_jsonl("tau/commonsense_qa/validation.jsonl", csqa)
  assert instruct_data.build_mcq(str(offline / "mcq")) == dict(mmlu=6, arc_challenge=3, commonsense_qa=1)
  items = [json.loads(l) for l in open(offline / "mcq" / "mmlu.jsonl")]
  assert sorted(i["question"] for i in items) == [f"q{i}" for i in range(6)]
  assert all(i["answer"] == int(i["question"][1:]) % 4 for i in items)  # the seed-42 shuffle keeps each answer
  arc_item = json.loads(open(offline / "mcq" / "arc_challenge.jsonl").readline())
  assert arc_item["choices"] == ["x", "y", "z"] and arc_item["answer"] == 2
