"""Tests of jaxreplay.data: tokenizer, token directories, corpora and the step-indexed loader."""

import hashlib
import json
import lzma
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from jaxreplay.data import (DataError, TrainBatches, eval_batches, load_tokenizer, open_token_dir, tokenizer_hash,
                            train_tokenizer, write_token_dir)
from jaxreplay.data.commands import build_default_corpora, resolve_path
from jaxreplay.data import commands, corpora, sword, tokenfile, versification

CORPORA = corpora.shared_corpora_dir()  # absent on a fresh clone: the tests below use tests/fixtures instead
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GENESIS = {"en_bible_kjv.txt.xz": "genesis_en_kjv.txt.xz", "es_bible_rv1909.txt.xz": "genesis_es_rv1909.txt.xz"}


def lines(name, n=None):
  """Verses of Genesis (its 1,533), from the small fixture copy of the shared Bible text."""
  with lzma.open(os.path.join(FIXTURES, GENESIS[name]), "rt") as f:
    out = f.read().splitlines()
  return out[:n] if n else out


def verse_label(b, slot):
  """'Book chapter:verse' of verse `slot` (0-based) of book b."""
  counts = versification.chapters(b)
  for chapter, n in enumerate(counts, 1):
    if slot < n:
      return f"{versification.BOOKS[b][1]} {chapter}:{slot + 1}"
    slot -= n


@pytest.fixture(scope="module")
def shared_bible(tmp_path_factory):
  """A full-length stand-in for shared/data/corpora's Bible pair: the real Genesis, then every other verse
  named by its book, chapter and verse, so a split into books can be checked verse by verse. The Spanish
  copy omits the verse slots Reina-Valera leaves empty, as the shared text does."""
  d = tmp_path_factory.mktemp("corpora")
  for lang, name in (("en", "en_bible_kjv.txt.xz"), ("es", "es_bible_rv1909.txt.xz")):
    labels = [verse_label(b, i) for b in range(66) for i in range(sum(versification.chapters(b)))]
    genesis = lines(name)
    verses = genesis + labels[len(genesis):]
    empty = set(corpora.EMPTY_VERSES[lang])
    with lzma.open(d / name, "wt", preset=0) as f:
      f.write("".join(v + "\n" for i, v in enumerate(verses) if i not in empty))
  return str(d)


@pytest.fixture
def use_shared_bible(shared_bible, monkeypatch):
  monkeypatch.setenv("JAXREPLAY_CORPORA", shared_bible)
  return shared_bible


def make_token_dir(path, train, valid=(), vocab_size=65536, dataset_id=0, dtype=None):
  """A token directory written directly, so tests know every token's position."""
  dtype = np.dtype(dtype or tokenfile.dtype_for(vocab_size))
  os.makedirs(path, exist_ok=True)
  np.asarray(train, dtype).tofile(os.path.join(path, "train.bin"))
  np.asarray(valid, dtype).tofile(os.path.join(path, "valid.bin"))
  meta = dict(vocab_size=vocab_size, dtype=dtype.name, tokenizer_hash="0" * 64, dataset_id=dataset_id, name="t",
              train_tokens=len(train), valid_tokens=len(valid), sources=[], valid_documents={}, eos_id=10)
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f)
  return str(path)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  train_tokenizer(lines("en_bible_kjv.txt.xz", 2000) + lines("es_bible_rv1909.txt.xz", 2000), 512, path)
  return path


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_reserved_ids_round_trip_and_hash(tok_path, tmp_path):
  tok = load_tokenizer(tok_path)
  assert tok.get_vocab_size() == 512
  assert [tok.token_to_id(f"<resv_{i}>") for i in range(10)] == list(range(10))
  assert tok.token_to_id("</s>") == 10
  text = "En el principio crió Dios los cielos — ünïcode 日本語 </s> <resv_3>\n\n  tabs\t!"
  ids = tok.encode(text, add_special_tokens=False).ids
  assert tok.decode(ids, skip_special_tokens=False) == text
  assert min(ids) > 10  # literal special-token text is text, never an EOS or dataset id
  with open(tok_path, "rb") as f:
    assert tokenizer_hash(tok_path) == hashlib.sha256(f.read()).hexdigest()
  assert load_tokenizer(os.path.dirname(tok_path)).encode(text).ids == ids  # a directory works too
  again = str(tmp_path / "again.json")  # training is deterministic: same data, same file
  train_tokenizer(lines("en_bible_kjv.txt.xz", 2000) + lines("es_bible_rv1909.txt.xz", 2000), 512, again)
  assert tokenizer_hash(again) == tokenizer_hash(tok_path)
  with pytest.raises(DataError, match="vocab_size=100"):
    train_tokenizer(["a b"], 100)
  with pytest.raises(DataError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- token directories

def test_write_token_dir_splits_whole_documents(tok_path, tmp_path):
  verses = lines("en_bible_kjv.txt.xz", 40)
  docs = [(f"doc{i}", f"Document {i}: " + " ".join(verses[i:i + 3])) for i in range(30)]
  out = str(tmp_path / "td")
  meta = write_token_dir(out, iter(docs), tok_path, dataset_id=3, name="demo", sources=["x"],
                         is_valid=tokenfile.every_kth(0.2), chunk_docs=7, progress=False)
  td = open_token_dir(out, 512, 8, tokenizer_hash=tokenizer_hash(tok_path))
  assert td.meta == meta and meta["dataset_id"] == 3 and meta["dtype"] == "uint16" and meta["documents"] == 30
  assert meta["valid_documents"] == dict(count=6, names=["doc4", "doc9", "doc14", "doc19", "doc24", "doc29"])
  assert os.path.isfile(os.path.join(out, "tokenizer.json")) and not os.path.exists(out + ".partial")
  tok = load_tokenizer(out)
  for split, want in (("train", [t for i, (_, t) in enumerate(docs) if i % 5 != 4]),
                      ("valid", [t for i, (_, t) in enumerate(docs) if i % 5 == 4])):
    arr = td.split(split)
    assert arr.size == meta[f"{split}_tokens"] and arr[-1] == 10
    ends = np.flatnonzero(arr == 10)
    got = [tok.decode(list(arr[a + 1:b]), skip_special_tokens=False) for a, b in zip([-1, *ends[:-1]], ends)]
    assert got == want


def test_dtype_follows_vocab_size(tmp_path):
  assert tokenfile.dtype_for(65536) == np.uint16 and tokenfile.dtype_for(65537) == np.uint32
  path = make_token_dir(tmp_path / "big", np.arange(100) + 70000, vocab_size=70200)
  td = open_token_dir(path, 70200, 10)
  assert td.train.dtype == np.uint32 and td.train[-1] == 70099


def test_bad_token_dirs_raise_one_clear_error(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    open_token_dir(str(tmp_path / "missing"), 512, 8)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="meta.json is missing"):
    open_token_dir(str(tmp_path / "empty"), 512, 8)
  good = make_token_dir(tmp_path / "good", np.arange(11, 411), np.arange(11, 111), vocab_size=512)
  open_token_dir(good, 512, 8)
  with pytest.raises(DataError, match="vocabulary of 512, larger than config.model.vocab_size=256"):
    open_token_dir(good, 256, 8)
  with pytest.raises(DataError, match="not the run's"):
    open_token_dir(good, 512, 8, tokenizer_hash="f" * 64)
  with pytest.raises(DataError, match="fewer than one sequence of seq_len=1000"):
    open_token_dir(good, 512, 1000)

  bad_ids = make_token_dir(tmp_path / "ids", np.r_[np.arange(11, 400), 600, 12], vocab_size=512)
  with pytest.raises(DataError, match=r"token id 600 \(first bad id at position 389\)"):
    open_token_dir(bad_ids, 512, 8)
  truncated = make_token_dir(tmp_path / "trunc", np.arange(11, 411), vocab_size=512)
  with open(os.path.join(truncated, "train.bin"), "ab") as f:
    f.write(b"\0")  # one odd byte: wrong size for uint16
  with pytest.raises(DataError, match="train.bin has 801 bytes"):
    open_token_dir(truncated, 512, 8)
  wrong_dtype = make_token_dir(tmp_path / "u32", np.arange(11, 411), vocab_size=512, dtype=np.uint32)
  meta_path = os.path.join(wrong_dtype, "meta.json")
  meta = json.load(open(meta_path))
  json.dump(dict(meta, dtype="uint16"), open(meta_path, "w"))  # file is uint32, meta claims uint16
  with pytest.raises(DataError, match="truncated or of another dtype"):
    open_token_dir(wrong_dtype, 512, 8)
  json.dump(dict(meta, dtype="float32"), open(meta_path, "w"))
  with pytest.raises(DataError, match="must be uint16 or uint32"):
    open_token_dir(wrong_dtype, 512, 8)
  json.dump({"vocab_size": 512}, open(meta_path, "w"))
  with pytest.raises(DataError, match="lacks dtype"):
    open_token_dir(wrong_dtype, 512, 8)
  os.remove(os.path.join(good, "valid.bin"))
  with pytest.raises(DataError, match="valid.bin is missing"):
    open_token_dir(good, 512, 8)
  with pytest.raises(DataError, match="config.data.path is empty"):
    resolve_path("")
  with pytest.raises(DataError, match="default:LANG"):
    resolve_path("default:fr")


def test_id_check_streams_in_chunks_without_copying(tmp_path, monkeypatch):
  """The id check is what keeps opening a many-GB token file cheap: numpy's max over memory-mapped chunks,
  never the whole file in memory (measured by allocation, not by the clock, so load cannot fail it)."""
  import tracemalloc
  n = 1 << 24  # 16M tokens, 32 MiB
  path = make_token_dir(tmp_path / "fast", np.full(n, 4095, np.uint16), vocab_size=4096)
  tracemalloc.start()
  open_token_dir(path, 4096, 256)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 1 << 20, f"opening a 32 MiB token file allocated {peak} bytes"
  monkeypatch.setattr(tokenfile, "_CHECK_CHUNK", 1000)  # many chunks: a bad id in any of them is found
  for at in (999, 1000, 10_499):
    tokens = np.full(10_500, 20, np.uint16)
    tokens[at] = 700
    bad = make_token_dir(tmp_path / f"bad{at}", tokens, vocab_size=512)
    with pytest.raises(DataError, match=rf"first bad id at position {at}\)"):
      open_token_dir(bad, 512, 8)


# ---------------------------------------------------------------- loader

@pytest.fixture
def seq_dir(tmp_path):
  """1,000 rows of 8 tokens whose content names the row: token k of the file is k + 11."""
  return make_token_dir(tmp_path / "seq", np.arange(11, 11 + 8000), np.arange(11, 11 + 800), dataset_id=2)


def row_of(batch):
  return (batch[:, 1] - 11) // 8


def test_rows_are_windows_with_dataset_id_and_each_epoch_a_permutation(seq_dir):
  tb = TrainBatches(seq_dir, 8, 40, seed=1)
  assert tb.steps_per_epoch == 25 and tb.tokens_per_epoch == 8000 and tb.dataset_ids == (2,)
  b = tb.batch(0)
  assert b.dtype == np.int32 and b.shape == (40, 8) and (b[:, 0] == 2).all()
  assert (b[:, 1:] == (row_of(b)[:, None] * 8 + 11 + np.arange(1, 8))).all()  # non-overlapping windows
  epoch0 = np.concatenate([row_of(tb.batch(s)) for s in range(25)])
  epoch1 = np.concatenate([row_of(tb.batch(s)) for s in range(25, 50)])
  assert sorted(epoch0) == sorted(epoch1) == list(range(1000))
  assert (epoch0 != epoch1).any() and (epoch0 != np.arange(1000)).any()
  assert (TrainBatches(seq_dir, 8, 40, seed=1).batch(7) == tb.batch(7)).all()
  assert (TrainBatches(seq_dir, 8, 40, seed=2).batch(7) != tb.batch(7)).any()
  assert (TrainBatches(seq_dir, 8, 40, seed=1, dataset_id=5).batch(0)[:, 0] == 5).all()


def test_resume_mid_epoch_equals_uninterrupted(seq_dir):
  full = [b for _, b in TrainBatches(seq_dir, 8, 40, seed=3).iterate(0, 60)]  # crosses two epoch ends
  resumed = TrainBatches(seq_dir, 8, 40, seed=3, prefetch=4)  # a fresh process after a restart
  steps, batches = zip(*resumed.iterate(37, 23))
  assert steps == tuple(range(37, 60))
  for a, b in zip(full[37:], batches):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mix_fraction", [0.0, 0.3])
def test_processes_get_disjoint_slices_of_the_global_batch(seq_dir, tmp_path, mix_fraction):
  mix_dir = make_token_dir(tmp_path / "mix", np.arange(20000, 20000 + 8000), dataset_id=1)
  mix = (mix_dir, mix_fraction, -1) if mix_fraction else None
  one = TrainBatches(seq_dir, 8, 40, seed=4, mix=mix)
  two = [TrainBatches(seq_dir, 8, 40, seed=4, process_index=p, process_count=2, mix=mix) for p in range(2)]
  for step in (0, 13, 24, 25, 99):
    parts = [t.batch(step) for t in two]
    assert all(p.shape == (20, 8) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), one.batch(step))
    keys = [set(map(tuple, p[:, :3].tolist())) for p in parts]
    assert len(keys[0]) == len(keys[1]) == 20 and not keys[0] & keys[1]


def test_mixing_fraction_is_exact(seq_dir, tmp_path):
  mix_dir = make_token_dir(tmp_path / "mix", np.arange(20000, 20000 + 8000), dataset_id=1)
  for fraction, want in ((0.25, 10), (0.1, 4), (0.01, 0), (0.51, 20)):
    tb = TrainBatches(seq_dir, 8, 40, seed=5, mix=(mix_dir, fraction, -1))
    assert tb.mix_rows == want
    for step in range(5):
      b = tb.batch(step)
      is_mix = b[:, 0] == 1
      assert is_mix.sum() == want and ((b[:, 0] == 2) == ~is_mix).all()
      assert (b[is_mix, 1] >= 20000).all() and (b[~is_mix, 1] < 20000).all()
  halves = [TrainBatches(seq_dir, 8, 40, seed=5, process_index=p, process_count=2, mix=(mix_dir, 0.25, 7))
            for p in range(2)]
  assert [(h.batch(3)[:, 0] == 7).sum() for h in halves] == [5, 5]  # spread evenly over processes
  with pytest.raises(DataError, match=r"\[0, 1\)"):
    TrainBatches(seq_dir, 8, 40, seed=5, mix=(mix_dir, 1.0, -1))
  with pytest.raises(DataError, match="leaves no row"):
    TrainBatches(seq_dir, 8, 40, seed=5, mix=(mix_dir, 0.99, -1))


def test_loader_errors(seq_dir):
  with pytest.raises(DataError, match="fewer than the 2000 one batch takes"):
    TrainBatches(seq_dir, 8, 2000, seed=0)
  with pytest.raises(DataError, match="does not split over 3 processes"):
    TrainBatches(seq_dir, 8, 40, seed=0, process_index=0, process_count=3)
  with pytest.raises(DataError, match="outside the reserved ids"):
    TrainBatches(seq_dir, 8, 40, seed=0, dataset_id=12)
  with pytest.raises(DataError, match="fewer than one eval batch"):
    eval_batches(seq_dir, "valid", 8, 200)


def test_eval_batches_are_fixed_and_sliced(seq_dir):
  ev = eval_batches(seq_dir, "valid", 8, 20, max_tokens=500, dataset_id=-1)
  assert len(ev) == 3 and ev.tokens == 480  # 500 // 160 batches
  b = ev[1]
  assert b.dtype == np.int32 and b.shape == (20, 8) and (b[:, 0] == 2).all()
  assert b[0, 1] == 11 + 160 + 1  # file order, no shuffle
  assert len(eval_batches(seq_dir, "valid", 8, 20)) == 5  # all of it, remainder dropped
  halves = [eval_batches(seq_dir, "valid", 8, 20, 500, 4, p, 2) for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves])[:, 1:], ev[k][:, 1:])
    assert (halves[0][k][:, 0] == 4).all()


# ---------------------------------------------------------------- corpora

def test_read_text_files_modes(tmp_path):
  text = "first line\nsecond line\n\n\nthird\nfourth\n"
  plain = tmp_path / "a.txt"
  plain.write_text(text)
  with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
    f.write(text)
  for path in (plain, tmp_path / "a.txt.xz"):
    assert list(corpora.read_text_files([str(path)], "lines")) == ["first line", "second line", "third", "fourth"]
    assert list(corpora.read_text_files([str(path)], "paragraphs")) == ["first line\nsecond line", "third\nfourth"]
    assert list(corpora.read_text_files([str(path)], "file")) == [text.strip()]
  with pytest.raises(DataError, match="mode='words'"):
    list(corpora.read_text_files([str(plain)], "words"))


def _write_zText(module_dir, verse_text):
  """A synthetic zText module in KJV versification: one block per book, headings as empty slots."""
  os.makedirs(module_dir)
  v = 0
  for testament, books in (("ot", range(versification.OT_BOOKS)), ("nt", range(versification.OT_BOOKS, 66))):
    bzs, bzv, bzz = [], [struct.pack("<IIH", 0, 0, 0)] * 2, b""
    for b in books:
      raw = b""
      bzv.append(struct.pack("<IIH", len(bzs), 0, 0))
      for n in versification.chapters(b):
        bzv.append(struct.pack("<IIH", len(bzs), 0, 0))
        for _ in range(n):
          data = verse_text(v).encode()
          bzv.append(struct.pack("<IIH", len(bzs), len(raw), len(data)))
          raw += data
          v += 1
      comp = zlib.compress(raw)
      bzs.append(struct.pack("<III", len(bzz), len(comp), len(raw)))
      bzz += comp
    for ext, data in (("bzs", b"".join(bzs)), ("bzv", b"".join(bzv)), ("bzz", bzz)):
      with open(os.path.join(module_dir, f"{testament}.{ext}"), "wb") as f:
        f.write(data)


def test_sword_reader_on_synthetic_module(tmp_path):
  osis = lambda v: "" if v == 5 else f'<w lemma="x">Verse</w> {v} &amp; <note n="a">a note</note>¶ end'
  _write_zText(str(tmp_path / "mod"), osis)
  books = sword.read_zText(sword.find_module(str(tmp_path)))
  assert [name for name, _ in books][:2] == ["Genesis", "Exodus"] and books[-1][0] == "Revelation"
  assert [len(vs) for _, vs in books] == [sum(versification.chapters(b)) for b in range(66)]
  verses = [v for _, vs in books for v in vs]
  assert len(verses) == 31102 and verses[0] == "Verse 0 & ¶ end" and verses[5] == ""
  assert verses[-1] == "Verse 31101 & ¶ end" and books[39][1][0] == "Verse 23145 & ¶ end"  # Matthew 1:1
  os.remove(tmp_path / "mod" / "nt.bzz")
  with pytest.raises(DataError, match="nt.bzz is missing"):
    sword.read_zText(str(tmp_path / "mod"))


def test_shared_bible_text_splits_into_parallel_books(use_shared_bible, monkeypatch):
  en, source = corpora.bible_books("en", "/nonexistent", source="shared")
  es, _ = corpora.bible_books("es", "/nonexistent", source="shared")
  assert source == "file:en_bible_kjv.txt.xz" and len(en) == len(es) == 66
  assert [len(v) for _, v in en] == [len(v) for _, v in es]
  assert en[0][1][0].startswith("In the beginning God") and es[0][1][0].startswith("EN el principio crió Dios")
  assert en[0][1][-1] == lines("en_bible_kjv.txt.xz")[-1]  # Genesis 50:26 ends Genesis
  assert [name for name, _ in en] == [b[1] for b in versification.BOOKS]
  for lang, books in (("en", en), ("es", es)):  # every verse after Genesis sits in its own slot
    for b, (_, verses) in enumerate(books[1:], 1):
      assert all(v == verse_label(b, i) for i, v in enumerate(verses) if v), (lang, b)
  assert sum(not v for _, vs in es for v in vs) == 18 and all(v for _, vs in en for v in vs)
  if CORPORA is not None:  # the real shared text too, where this checkout has it
    monkeypatch.setenv("JAXREPLAY_CORPORA", CORPORA)
    en, es = (corpora.bible_books(lang, "/nonexistent", source="shared")[0] for lang in ("en", "es"))
    assert en[-1][1][-1].startswith("The grace of our Lord") and es[-1][1][-1].startswith("La gracia de nuestro")
    assert sum(not v for _, vs in es for v in vs) == 18


def test_bible_falls_back_to_shared_text_when_apt_fails(use_shared_bible, monkeypatch):
  def no_registry(package, cache_dir, timeout=300):
    raise DataError(f"`apt-get download {package}` failed (offline)")
  monkeypatch.setattr(corpora, "download_deb", no_registry)
  books, source = corpora.bible_books("es", "/nonexistent")
  assert source == "file:es_bible_rv1909.txt.xz" and books[0][0] == "Genesis"
  with pytest.raises(DataError, match="offline"):
    corpora.bible_books("es", "/nonexistent", source="debian")


@pytest.mark.network
def test_debian_bible_pair_is_verse_parallel(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("debs"))
  try:
    en, en_src = corpora.bible_books("en", cache, source="debian")
    es, es_src = corpora.bible_books("es", cache, source="debian")
  except DataError as e:
    pytest.skip(f"Debian's package registry is unreachable ({e})")
  assert (en_src, es_src) == ("deb:sword-text-kjv", "deb:sword-text-sparv")
  n_en, n_es = (sum(bool(v) for _, vs in b for v in vs) for b in (en, es))
  assert n_en == 31102 and 31000 < n_es <= 31102
  assert [len(v) for _, v in en] == [len(v) for _, v in es]
  john_3_16 = sum(versification.chapters(42)[:2]) + 15
  assert en[42][0] == "John" and "For God so loved the world" in en[42][1][john_3_16]
  assert "amó Dios al mundo" in es[42][1][john_3_16]
  if CORPORA is not None:  # the shared copy is the same text, so the fallback gives the same books
    assert corpora.bible_books("en", cache, source="shared")[0] == en
    assert corpora.bible_books("es", cache, source="shared")[0] == es


def test_build_default_corpora_is_cached_and_parallel(use_shared_bible, tmp_path, monkeypatch, capsys):
  real = corpora.bible_books
  short = lambda lang, cache, source="auto": ([(n, v[:20]) for n, v in real(lang, cache, "shared")[0]], "short")
  monkeypatch.setattr(corpora, "bible_books", short)
  flag = str(tmp_path / "flag")
  dirs = {lang: resolve_path(f"default:{lang}:400", cache_dir=flag) for lang in ("en", "es")}  # --cache_dir
  assert dirs == {lang: os.path.join(flag, "bible_v400", lang) for lang in ("en", "es")}
  said = capsys.readouterr().err  # what it fetches and where, once
  assert said.count("\n") == 1 and os.path.join(flag, "bible_v400") in said and "sword-text-kjv" in said
  en, es = (open_token_dir(dirs[k], 400, 16) for k in ("en", "es"))
  assert (en.meta["dataset_id"], es.meta["dataset_id"]) == (0, 1)
  assert en.meta["tokenizer_hash"] == es.meta["tokenizer_hash"] == tokenizer_hash(dirs["en"])
  assert en.meta["valid_documents"]["names"] == es.meta["valid_documents"]["names"] == ["Proverbs", "Matthew",
                                                                                          "1 Peter"]
  monkeypatch.setattr(corpora, "bible_books", None)  # a second call must not read anything, nor say anything
  assert build_default_corpora(flag, vocab_size=400) == dirs and capsys.readouterr().err == ""


def test_cache_dir_follows_xdg_then_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("JAXREPLAY_CACHE", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  assert commands.cache_dir_default() == str(tmp_path / "home" / ".cache" / "jaxreplay")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert commands.cache_dir_default() == str(tmp_path / "xdg" / "jaxreplay")
  monkeypatch.setenv("JAXREPLAY_CACHE", str(tmp_path / "mine"))
  assert commands.cache_dir_default() == str(tmp_path / "mine")
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("JAXREPLAY_CACHE", str(tmp_path / "file" / "sub"))  # cannot be created, even by root
  with pytest.raises(DataError, match=r"file/sub cannot be written \(Not a directory\): pass --cache_dir"):
    build_default_corpora(vocab_size=400)


def test_records_to_texts(tmp_path):
  """(The `hf:` input itself is tested with the real `datasets` library in test_hf_datasets.py.)"""
  records = [{"text": "a page"}, {"text": "  "}, {"text": "another"}, {"text": "third"}]
  assert list(corpora.texts_from_records(records, limit=2)) == ["a page", "another"]
  with pytest.raises(DataError, match="no field 'content'"):
    list(corpora.texts_from_records(records, "content"))


def test_cli_tokenizer_and_tokenize(tmp_path, capsys):
  src = tmp_path / "es.txt"
  src.write_text("\n".join(lines("es_bible_rv1909.txt.xz", 1000)) + "\n")
  tok = str(tmp_path / "tok.json")
  assert commands.main(["jaxreplay data", "tokenizer", "--out", tok, "--vocab_size", "300", str(src)]) == 0
  capsys.readouterr()
  out = str(tmp_path / "es")
  assert commands.main(["jaxreplay data", "tokenize", "--tokenizer", tok, "--out", out, "--dataset_id", "1",
                        "--valid_fraction", "0.1", str(src)]) == 0
  meta = open_token_dir(out, 300, 32).meta
  assert meta["documents"] == 1000 and meta["valid_documents"]["count"] == 100  # one block of 100 lines in 10
  assert meta["valid_documents"]["names"][:2] == [900, 901]
  printed = capsys.readouterr().out.strip().splitlines()  # a short summary, not the document ids
  total = meta["train_tokens"] + meta["valid_tokens"]
  assert len(printed) == 3 and f"{total:,} tokens in 1,000 documents" in printed[0]
  assert os.path.abspath(out) in printed[0] and f"validation: {meta['valid_tokens']:,} tokens" in printed[1]
  assert "in 100 documents" in printed[1] and "901" not in "".join(printed)
  with pytest.raises(DataError, match="neither a file nor a corpus name"):  # the CLI prints it and exits 2
    commands.main(["jaxreplay data", "tokenize", "--tokenizer", tok, "--out", out, "--dataset_id", "1",
                   str(tmp_path / "missing.txt")])


def _files_under(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def test_cli_refuses_empty_and_non_utf8_inputs_and_keeps_what_was_written(tok_path, tmp_path):
  """Through the real CLI: exit 2, one sentence naming the file (and the byte offset), no token directory
  made or left half-made, and a token directory already at --out untouched."""
  good = tmp_path / "good.txt"
  good.write_text("\n".join(lines("en_bible_kjv.txt.xz", 50)) + "\n")
  latin = "Génesis 1:1 En el principio\n".encode("latin-1")
  (tmp_path / "latin.txt").write_bytes(b"In the beginning\n" * 3 + latin)
  with lzma.open(tmp_path / "cut.txt.xz", "wb") as f:
    f.write("año\n".encode() * 4 + "ñ".encode()[:1])  # a 2-byte character cut off at the end
  cut_at = len("año\n".encode()) * 4
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("  \n\n\t\n")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(FIXTURES)), JAX_PLATFORMS="cpu")

  def jaxreplay(*args, out):
    return subprocess.Popen([sys.executable, "-m", "jaxreplay.cli", "data", *args, f"--out={out}"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  kept = tmp_path / "kept"
  assert jaxreplay("tokenize", f"--tokenizer={tok_path}", "--dataset_id=0", str(good), out=kept).wait() == 0
  before = _files_under(kept)
  first_bad = (b"In the beginning\n" * 3 + latin).index(b"\xe9")  # independent of the library's scan
  cases = [  # (args, out, the words the error must hold)
      (["tokenize", str(tmp_path / "empty.txt")], tmp_path / "t_empty", ["empty.txt", "holds no text"]),
      (["tokenize", str(good), str(tmp_path / "blank.txt")], kept, ["blank.txt", "holds no text"]),
      (["tokenize", str(tmp_path / "latin.txt")], kept, ["latin.txt", f"byte offset {first_bad} holds e9"]),
      (["tokenize", str(tmp_path / "cut.txt.xz")], tmp_path / "t_cut",
       ["cut.txt.xz", f"byte offset {cut_at} of the decompressed text holds c3"]),
      (["tokenizer", "--vocab_size=300", str(tmp_path / "empty.txt")], tmp_path / "tok_empty.json",
       ["empty.txt", "holds no text"]),
  ]
  procs = [(args, want, jaxreplay(*args[:1], *([f"--tokenizer={tok_path}", "--dataset_id=0"]
                                               if args[0] == "tokenize" else []), *args[1:], out=out))
           for args, out, want in cases]
  for args, want, p in procs:
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]  # above it only the progress bar
    assert p.returncode == 2 and "Traceback" not in err, (args, err)
    assert last.startswith("jaxreplay: error: ") and all(w in last for w in want), (args, last)
  assert _files_under(kept) == before
  assert sorted(os.listdir(tmp_path)) == sorted(["good.txt", "latin.txt", "cut.txt.xz", "empty.txt", "blank.txt",
                                                 "kept"])  # no new directory, no temporary left behind


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_first_non_utf8_across_chunk_boundaries(tmp_path, chunk):
  data = "ok ñandú €5 ".encode() * 5 + b"\xe2\x82" + "x 🙂".encode()  # a 3-byte character missing its last byte
  path = tmp_path / "t.txt"
  path.write_bytes(data)
  with pytest.raises(UnicodeDecodeError) as e:
    data.decode("utf-8")
  assert corpora.first_non_utf8(str(path), chunk) == (e.value.start, data[e.value.start:e.value.end])
