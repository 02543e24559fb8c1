"""Device mesh, partition rules for parameters and batches, and placing host data on the mesh.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded) and
`tensor` (attention heads and MLP width split across devices). Batches are split over data × fsdp.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreplay.errors import MeshError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = {a: int(mesh_cfg[a]) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"Only one mesh axis may be -1, got {', '.join('config.mesh.' + a for a in free)}: "
                    "give the others explicit sizes.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % fixed:
      raise MeshError(f"config.mesh fixes {fixed} devices per replica but {n} devices are present: "
                      f"choose sizes whose product divides {n}.")
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise MeshError(f"config.mesh data×fsdp×tensor = {math.prod(sizes.values())} but {n} devices are present: "
                    "make the product equal the device count (or set one axis to -1).")
  shape = tuple(sizes[a] for a in AXES)
  # Auto axes: XLA's partitioner propagates shardings from the parameters and batch we place explicitly.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if any(getattr(d, "core_on_chip", 0) for d in devices):
    # One device per TensorCore (v4/v5p outside megacore): jax.make_mesh's topology-aware order wants one device
    # per chip, so the devices keep their listed order, which places a chip's cores side by side.
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


# Rules for the decoder's parameters (jaxreplay/models/decoder.py), keyed by leaf name; dims in the order of the
# unstacked weight. Leading stacked-layer dims are replicated, as are norm scales. A dim that the axis size does
# not divide stays replicated.
_RULES = {
    "embed": ("tensor", "fsdp"),  # [V, D]
    "unembed": ("fsdp", "tensor"),  # [D, V]
    "q_proj": ("fsdp", "tensor", None),  # [D, N, H]
    "k_proj": ("fsdp", "tensor", None),  # [D, K, H]
    "v_proj": ("fsdp", "tensor", None),  # [D, K, H]
    "o_proj": ("tensor", None, "fsdp"),  # [N, H, D]
    "gate_proj": ("fsdp", "tensor"),  # [D, F]
    "up_proj": ("fsdp", "tensor"),  # [D, F]
    "down_proj": ("tensor", "fsdp"),  # [F, D]
    "q_bias": ("tensor", None), "k_bias": ("tensor", None), "v_bias": ("tensor", None),  # [N or K, H]
    "lora_a": (),
    "lora_b": (),
}


def _leaf_name(path) -> str:
  for entry in reversed(path):
    name = getattr(entry, "key", None) or getattr(entry, "name", None)
    if isinstance(name, str):
      return name
  return ""


def param_spec(path, shape, mesh: Mesh) -> P:
  rule = _RULES.get(_leaf_name(path), ())
  rule = (None,) * (len(shape) - len(rule)) + tuple(rule) if len(rule) <= len(shape) else (None,) * len(shape)
  return P(*(axis if axis is not None and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None
             for dim, axis in zip(shape, rule)))


def param_shardings(params_shapes, mesh: Mesh):
  """NamedShardings for a pytree of parameters (or anything shaped like them, e.g. Adam moments)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, mesh)) if hasattr(x, "shape") and x.ndim
      else NamedSharding(mesh, P()), params_shapes)


def state_shardings(abstract_state, mesh: Mesh) -> dict:
  """Shardings of a train state {params, opt_state, step}: Adam moments follow their parameters."""
  return dict(params=param_shardings(abstract_state["params"], mesh),
              opt_state=param_shardings(abstract_state["opt_state"], mesh), step=NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def local_rows(x: np.ndarray) -> np.ndarray:
  """This process's share of a global batch's rows (all of them on one host)."""
  return np.array_split(x, jax.process_count())[jax.process_index()]


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh, local_batch.ndim)
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.make_array_from_process_local_data(sharding, local_batch)
