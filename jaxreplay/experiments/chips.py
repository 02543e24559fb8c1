"""Published per-chip figures of the TPU generations a run can be compiled for: the one table every roofline
estimate reads (`jaxreplay compile`, `sweep --dry-run --target`).

Figures are Google Cloud's, per chip (not per TensorCore):
- v4:  https://cloud.google.com/tpu/docs/v4  — 275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s; 2 TensorCores that
  JAX drives as one device (megacore).
- v5e: https://cloud.google.com/tpu/docs/v5e — 197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s; 1 TensorCore.
- v5p: https://cloud.google.com/tpu/docs/v5p — 459 TFLOP/s bf16, 95 GB HBM2e, 2,765 GB/s; 2 TensorCores
  (megacore).
- v6e: https://cloud.google.com/tpu/docs/v6e — 918 TFLOP/s bf16, 32 GB HBM, 1,640 GB/s; 1 TensorCore.
(GB = 1e9 bytes, GiB = 2^30 bytes, as each page states its capacity.) The compiler's own limit is a little below
the capacity (it reserves some HBM; v5e reports 15.75 GiB available): a program that passes the compiler fits.
"""

from __future__ import annotations

import dataclasses

GB, GiB = 1e9, float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the topology prefix: v5e in v5e:2x2
  peak_bf16_flops: float  # FLOP/s per chip, dense bf16 matrix multiplication
  hbm_bytes: float  # HBM capacity per chip
  hbm_bandwidth: float  # bytes/s per chip
  cores_per_chip: int  # TensorCores per chip; > 1: megacore, one JAX device per chip


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200 * GB, 2),
    "v5e": Chip("v5e", 197e12, 16 * GB, 819 * GB, 1),
    "v5p": Chip("v5p", 459e12, 95 * GB, 2765 * GB, 2),
    "v6e": Chip("v6e", 918e12, 32 * GB, 1640 * GB, 1),
}


def roofline_seconds(chip: Chip, flops: float, bytes_accessed: float) -> float:
  """The least time one chip needs for a program: its FLOPs at peak, or its HBM traffic at full bandwidth."""
  return max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth)
