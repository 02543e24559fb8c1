"""A small reader of SWORD zText Bible modules (the format of Debian's sword-text-* packages).

Why our own: the SWORD library is C++ and the Python readers are unmaintained; the format is simple.
Per testament (`ot`, `nt`) a zText module has three files:
  *.bzs  block index, one record per compressed block: uint32 offset, uint32 size, uint32 raw size;
  *.bzv  verse index, one record per slot: uint32 block, uint32 offset in the raw block, uint16 size;
  *.bzz  the zlib-compressed blocks, concatenated.
Slots follow the versification: a testament heading and a module heading, then per book one heading slot
and per chapter one heading slot followed by its verses. Verse text is OSIS XML, reduced here to plain text.
"""

from __future__ import annotations

import html
import os
import re
import zlib

import numpy as np

from jaxreplay.errors import DataError

from .versification import BOOKS, OT_BOOKS, chapters

_BZS = np.dtype([("offset", "<u4"), ("size", "<u4"), ("raw", "<u4")])
_BZV = np.dtype([("block", "<u4"), ("offset", "<u4"), ("size", "<u2")])
_DROP = re.compile(r"<(note|title)\b[^>]*?/>|<(note|title)\b[^>]*>.*?</\2>", re.S)  # footnotes, headings
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def osis_to_text(osis: str) -> str:
  """Verse text without markup, footnotes or editorial headings."""
  text = _TAG.sub("", _DROP.sub("", osis))
  return _SPACE.sub(" ", html.unescape(text)).strip()


def _read_testament(module_dir: str, testament: str) -> list[str]:
  paths = {ext: os.path.join(module_dir, f"{testament}.{ext}") for ext in ("bzs", "bzv", "bzz")}
  for p in paths.values():
    if not os.path.isfile(p):
      raise DataError(f"SWORD module file {p} is missing: {module_dir} is not a complete zText module.")
  blocks_index = np.fromfile(paths["bzs"], dtype=_BZS)
  slots = np.fromfile(paths["bzv"], dtype=_BZV)
  with open(paths["bzz"], "rb") as f:
    data = f.read()
  blocks = {}
  out = []
  for block, offset, size in slots.tolist():
    if size == 0:
      out.append("")
      continue
    if block not in blocks:
      o, n, _ = blocks_index[block].tolist()
      blocks[block] = zlib.decompress(data[o:o + n])
    out.append(blocks[block][offset:offset + size].decode("utf-8", errors="replace"))
  return out


def read_zText(module_dir: str) -> list[tuple[str, list[str]]]:
  """Returns [(book name, [verse text, ...]), ...] for the 66 books of the KJV versification.

  Verses empty in the module stay as "" so that the verse lists of two translations stay parallel.
  """
  books = []
  for testament, book_ids in (("ot", range(OT_BOOKS)), ("nt", range(OT_BOOKS, len(BOOKS)))):
    slots = _read_testament(module_dir, testament)
    expected = 2 + sum(1 + sum(1 + v for v in chapters(b)) for b in book_ids)
    if len(slots) != expected:
      raise DataError(f"{module_dir}/{testament}.bzv has {len(slots)} slots, not the {expected} of the KJV "
                      "versification: use a module with Versification=KJV.")
    i = 2  # testament + module heading slots
    for b in book_ids:
      i += 1  # book heading
      verses = []
      for n in chapters(b):
        i += 1  # chapter heading
        verses.extend(osis_to_text(s) for s in slots[i:i + n])
        i += n
      books.append((BOOKS[b][1], verses))
  return books


def find_module(root: str) -> str:
  """The data directory of the single zText module under an extracted package tree."""
  found = []
  for dirpath, _, files in os.walk(root):
    if "ot.bzv" in files or "nt.bzv" in files:
      found.append(dirpath)
  if len(found) != 1:
    raise DataError(f"Expected exactly one SWORD zText module under {root}, found {len(found)}: "
                    "delete the directory so the package is extracted again.")
  return found[0]
