"""The numbers and figures of docs/results.md, from the reproduction sweeps' results tables.

  python docs/repro_numbers.py [--runs runs/repro] [--docs docs]

For each finished sweep under --runs (toy_cpu, en_es, tpp, batch_size) it runs `jaxreplay report` into
RUNS/NAME/report, copies the main figure into docs/ and prints the claim check as Markdown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics as st
import sys
from collections import defaultdict

from jaxreplay.experiments import report, results_table

FIGURES = dict(toy_cpu=["toy_continual.png"], en_es=["trajectories.png"], tpp=["capacity_slices.png"],
               batch_size=["batch_size.png"])


def _ms(xs, f="{:.3f}") -> str:
  """Mean (min, max, n) over seeds."""
  xs = [x for x in xs if x is not None]
  if not xs:
    return "–"
  if len(xs) == 1:
    return f.format(xs[0])
  return f"{f.format(st.mean(xs))} (min {f.format(min(xs))}, max {f.format(max(xs))}, n={len(xs)})"


def toy(res) -> str:
  rows = results_table.toy_final(res)
  lines = ["| arm | seed | last task trained | add | reversal | sort | modadd |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['arm']} | {r['seed']} | {r['last']} | " + " | ".join(f"{r.get(t, float('nan')):.1%}" for t in
                                                                  ("add", "reversal", "sort", "modadd")) + " |")
  lines.append("")
  partial = sorted({r["last"] for r in rows if r["last"] != "modadd"})
  if partial:
    lines.append(f"- Chains not finished yet (last task trained: {', '.join(partial)}); the claims are judged on "
                 "finished chains only.")
  rows = [r for r in rows if r["last"] == "modadd"]
  no = [r for r in rows if r["arm"] == "without replay"]
  yes = [r for r in rows if r["arm"] != "without replay"]
  worst_no = max((r[t] for r in no for t in ("add", "reversal", "sort")), default=None)
  worst_yes = min((r[t] for r in yes for t in ("add", "reversal", "sort", "modadd")), default=None)
  if worst_no is not None:
    lines.append(f"- Without replay, the highest final accuracy on an earlier task (any seed): {worst_no:.1%} "
                 f"(claim: ≤ 30%: {'holds' if worst_no <= 0.30 else 'does not hold'}).")
  if worst_yes is not None:
    lines.append(f"- With self-generated replay, the lowest final accuracy on any task (any seed): {worst_yes:.1%} "
                 f"(claim: ≥ 95%: {'holds' if worst_yes >= 0.95 else 'does not hold'}).")
  return "\n".join(lines)


def en_es(res) -> str:
  rows = results_table.matched_forgetting(res)
  by = defaultdict(list)
  for r in rows:
    by[r["method"]].append(r)
  lines = ["| method | seeds | English rise at matched Spanish loss | forgetting cut vs no replay |",
           "|---|---|---|---|"]
  for m, rs in sorted(by.items()):
    lines.append(f"| {m} | {', '.join(str(r['seed']) for r in rs)} | {_ms([r['rise'] for r in rs])} | "
                 + (_ms([r.get('cut') for r in rs], "{:.1%}") if m != "no replay" else "–") + " |")
  lines.append("")
  lines.append("Matched Spanish loss per seed: " + ", ".join(
      f"seed {r['seed']}: {r['matched_downstream']:.3f}" for r in rows if r["method"] == "no replay"))
  return "\n".join(lines)


def tpp(res) -> str:
  rows = results_table.capacity_slice(res, "tpp")
  lines = ["| TPP | English loss before | best English loss after | forgetting | best run |", "|---|---|---|---|---|"]
  for r in rows:
    f = r["after"] - r["before"] if r["after"] is not None and r["before"] is not None else None
    lines.append(f"| {r['x']:g} | {r['before']:.3f} | " + (f"{r['after']:.3f} | {f:+.3f}" if f is not None else "– | –")
                 + f" | {r['best']} |")
  if not rows:
    return "\n".join(lines)
  target = rows[0]["matched_downstream"]
  lines.append(f"\nCompared at Spanish loss {target:.3f} (the lowest that every run reached).\n")
  # Every arm: English rise at that loss, and the compute multiplier at the end of finetuning.
  arms = defaultdict(dict)
  for r in res.finetunes():
    tpp_ = results_table.x_of(r, res, "tpp")
    label = results_table.method_label(r) + ("" if results_table.cfg(r, "replay.method") == "none"
                                      else f" {results_table.cfg(r, 'replay.coeff'):g}")
    y = results_table.at_matched(results_table.trajectory(res.history(r["name"])), target)
    before = r["metrics"].get("prev_ntp_before")
    arms[label][tpp_] = (y - before if y is not None and before is not None else None,
                         r["metrics"].get("compute_multiplier"))
  tpps = sorted({t for by in arms.values() for t in by})
  lines += ["| arm | " + " | ".join(f"TPP {t:g}: rise / multiplier" for t in tpps) + " |", "|---" * (len(tpps) + 1) + "|"]
  for label, by in sorted(arms.items()):
    cell = lambda v: "–" if v is None else (f"{v[0]:+.3f}" if v[0] is not None else "–") + f" / {v[1]:.2f}"
    lines.append(f"| {label} | " + " | ".join(cell(by.get(t)) for t in tpps) + " |")
  return "\n".join(lines)


def batch_size(res) -> str:
  rules = results_table.batch_size_rules(res)
  sizes = sorted({b for by_bs in rules.values() for b in by_bs})
  lines = ["| rule | " + " | ".join(f"batch {b}" for b in sizes) + " | spread of means | spread per seed |",
           "|---" * (len(sizes) + 3) + "|"]
  seeds_by_rule = defaultdict(lambda: defaultdict(dict))
  for r in res.pretrains():
    hl = results_table.cfg(r, "optim.b2_half_life_tokens", 0.0)
    rule = f"half-life {hl / 1e6:.3g}M tokens" if hl else f"β₂ = {results_table.cfg(r, 'optim.b2')}"
    seeds_by_rule[rule][results_table.cfg(r, "seed")][results_table.cfg(r, "optim.batch_size")] = r["metrics"]["valid_ntp"]
  for rule, by_bs in rules.items():
    means = {b: st.mean(v) for b, v in by_bs.items()}
    per_seed = [max(d.values()) - min(d.values()) for d in seeds_by_rule[rule].values() if len(d) > 1]
    cell = lambda b: (f"{means[b]:.3f}" + (f" ({min(by_bs[b]):.3f}–{max(by_bs[b]):.3f})" if len(by_bs[b]) > 1 else "")
                      if b in by_bs else "–")
    lines.append(f"| {rule} | " + " | ".join(cell(b) for b in sizes)
                 + f" | {max(means.values()) - min(means.values()):.3f} | "
                 + ", ".join(f"{x:.3f}" for x in per_seed) + " |")
  return "\n".join(lines)


def main(argv) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--runs", default="runs/repro")
  p.add_argument("--docs", default="docs")
  a = p.parse_args(argv[1:])
  for name, fn in (("toy_cpu", toy), ("en_es", en_es), ("tpp", tpp), ("batch_size", batch_size)):
    w = os.path.join(a.runs, name)
    if not os.path.exists(os.path.join(w, "results.sqlite")):
      continue
    res = results_table.Results(w)
    if not res.rows:
      continue
    out = os.path.join(w, "report")
    os.makedirs(a.docs, exist_ok=True)
    written = report.report(w, out)
    for fig in FIGURES[name]:
      src = os.path.join(out, fig)
      if src in written:
        shutil.copyfile(src, os.path.join(a.docs, f"{name}_{fig}"))
    print(f"## {name} ({len(res.rows)} runs finished)\n")
    try:
      print(fn(res))
    except (ValueError, KeyError, StopIteration, TypeError) as e:
      print(f"(not enough finished runs for the summary: {e!r})")
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
