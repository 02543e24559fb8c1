"""`jaxreplay compile --config=FILE.py[:ARG] [--config.KEY=VALUE ...] --target=TOPOLOGY [--json=PATH]`: every
program of a run compiled for a TPU slice on this machine (no TPU needed), printed as a table and written as JSON.
Exit 2, with one sentence, when the inputs are wrong (before any compile) or a program does not fit.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxreplay.errors import UsageError
from jaxreplay.experiments import resolve, tpu_compile
from jaxreplay.io import write_json

COLUMNS = ("program", "HBM/chip GB", "of GB", "GFLOP/chip", "GB accessed", "roofline ms", "bound", "tokens/s", "MFU",
           "compile s")


def parse(argv: list[str]):
  """(config, topology, json path) from `jaxreplay compile` flags."""
  overrides, rest = resolve.take_overrides(argv)
  p = argparse.ArgumentParser(prog=rest[0], description=__doc__, allow_abbrev=False)
  p.add_argument("--config", help="experiment file, e.g. sweeps/quickstart.py:pretrain")
  p.add_argument("--target", required=True, help="a TPU topology, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v6e:2x4")
  p.add_argument("--json", default="", help="where to write the report (default: compile_TARGET.json)")
  a = p.parse_args(rest[1:])
  if a.config is None:
    raise UsageError("--config is required, e.g. --config=sweeps/quickstart.py:pretrain.")
  tpu_compile.target(a.target)  # an unknown topology or missing libtpu: before the config is loaded
  c = resolve.run_config(a.config, None, overrides)
  return c, a.target, a.json or f"compile_{a.target.replace(':', '_')}.json"


def table(report: dict) -> str:
  rows = [COLUMNS]
  for name, r in report.items():
    cost = r.get("flops") is not None
    rows.append((name, f"{r['hbm_per_chip'] / 1e9:.2f}", f"{r['chip_hbm'] / 1e9:.1f}",
                 f"{r['flops'] / 1e9:.1f}" if cost else "", f"{r['bytes_accessed'] / 1e9:.2f}" if cost else "",
                 f"{r['roofline_s'] * 1e3:.3f}" if cost else "", r.get("bound", ""),
                 f"{r['tokens_per_s']:.3g}" if r.get("tokens_per_s") else "",
                 f"{r['mfu']:.1%}" if r.get("mfu") is not None else "", f"{r['compile_s']:.1f}"))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                   for row in rows)


def main(argv: list[str]) -> int:
  c, topology, out = parse(argv)
  tgt = tpu_compile.target(topology)
  report = tpu_compile.compile_run(c, tgt, log=lambda line: print(line, file=sys.stderr))
  print(f"{topology}: {tgt.chips} {tgt.chip.name} chips on {tgt.hosts} host(s); FLOPs and bytes per chip with every "
        "loop trip counted (variants of 1 and 2 layers per trip, 1 and 2 microbatches' rows, extrapolated)")
  print(table(report))
  write_json(out, dict(target=topology, chips=tgt.chips, hosts=tgt.hosts, chip=vars(tgt.chip), programs=report),
             sort_keys=True)
  print(f"wrote {os.path.abspath(out)}")
  return 0


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main(sys.argv))
