"""Meshes and the one table that maps logical axis names to mesh axes.

Model code names axes logically (batch, length, embed, heads, kv, mlp, vocab,
layers, expert); only this module and the config know the mesh axes (data, fsdp,
expert, tensor). A logical name missing from the rules raises instead of silently
replicating.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Batch over data, fsdp and expert; parameters' embed dim over fsdp (ZeRO-3 style);
# heads and MLP width over tensor (Megatron style); a mixture of experts' experts over
# expert, which is one more data-parallel axis for everything else (docs/moe.md).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert", "expert"),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: all devices not used by the other axes
  fsdp: int = 1
  tensor: int = 1
  rules: Rules = DEFAULT_RULES
  expert: int = 1  # experts of a mixture of experts split over this many devices

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.expert, self.tensor]
    if sizes.count(-1) > 1:
      raise UserError("mesh: at most one of data, fsdp, expert, tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or num_devices % known:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices, "
                      f"but {num_devices} are present")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, expert, tensor) mesh with Auto axis types, set explicitly (jax>=0.10
  defaults to Explicit, under which sharded contractions fail)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """Devices the batch is split over (the mesh axes the rules map `batch` to)."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes if a is not None]))


def check_expert_axis(num_experts: int, mesh: Mesh, rules: Rules) -> None:
  """A mixture of experts' experts must split evenly over the mesh axes `expert` maps to."""
  axes = nn.logical_to_mesh_axes(("expert",), rules)[0] if num_experts else None
  axes = axes if isinstance(axes, tuple) else (axes,)
  size = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
  if num_experts % size:
    raise UserError(f"mesh.expert={size} does not divide model.moe.num_experts={num_experts}")


def check_rules(rules: Rules) -> Rules:
  rules = tuple((str(name), tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)
  for name, axes in rules:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"mesh.rules: {name!r} maps to unknown mesh axis {axis!r}")
  return rules


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Boxed (logically partitioned) abstract tree -> NamedSharding tree."""
  specs = nn.get_partition_spec(logical_tree)
  known = {name for name, _ in rules}

  def check(spec):
    for name in spec:
      for n in (name if isinstance(name, tuple) else (name,)):
        if n is not None and n not in known:
          raise UserError(f"logical axis {n!r} has no entry in mesh.rules")
    return spec

  specs = jax.tree.map(check, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of (batch, length) input arrays."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def batch_shardings(mesh: Mesh, rules: Rules, sample: dict[str, Any]) -> dict[str, NamedSharding]:
  """Shardings of a batch's arrays by rank: (batch,) labels, (batch, length) token rows."""
  return {k: NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length")[:v.ndim], rules))
          for k, v in sample.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def unbox(tree: Any) -> Any:
  """Drops logical-axis boxes without applying sharding constraints (safe outside jit)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
