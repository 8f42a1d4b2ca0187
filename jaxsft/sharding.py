"""The device mesh and the one table that maps logical axis names to mesh axes.

Changing the parallelism is editing RULES, not the model. FSDP is nothing but these shardings
handed to `jax.jit`; XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsft.config import MESH_AXES, ConfigError

# rows of a batch are split over the data-parallel axes; the expert axis shares the batch too (as in
# MaxText), so its devices hold different experts and different rows
BATCH_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"  # heads, MLP width and vocab

# logical axis -> mesh axes (in order of preference); None = replicated.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": None,
    "head_dim": None,
    "lora_rank": None,
    "expert": (EXPERT_AXIS,),  # MoE experts
}


def mesh_shape(mesh_cfg: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve -1 and check the product against the device count."""
    sizes = {axis: mesh_cfg.get(axis, 1) for axis in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(f"mesh {mesh_cfg}: {num_devices} devices do not divide by the fixed axes "
                                  f"(product {known})")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {mesh_cfg} has {math.prod(sizes.values())} devices but {num_devices} are "
                          f"available; make the product match or set one axis to -1")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: dict[str, int], devices: list | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all devices (jax.make_mesh picks a topology-aware order)."""
    auto = (AxisType.Auto,) * len(MESH_AXES)  # shardings propagate through jit; we annotate edges only
    if devices is None:
        return jax.make_mesh(mesh_shape(mesh_cfg, jax.device_count()), MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(mesh_shape(mesh_cfg, len(devices))), MESH_AXES, axis_types=auto)


def check_expert_axis(mesh: Mesh, num_experts: int) -> None:
    """The expert axis must split the experts evenly (a dense model has none to split: there the axis
    only shares the batch)."""
    size = mesh.shape[EXPERT_AXIS]
    if size > 1 and num_experts and num_experts % size:
        raise ConfigError(f"mesh axis 'expert' ({size}) does not divide the model's {num_experts} experts; "
                          f"use a divisor of {num_experts}")


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical axis takes its mesh axes if they divide the dim
    and are not used by an earlier dim (tiny test models fall back to replication)."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        mesh_axes = [a for a in (RULES.get(name) or ()) if a not in used and mesh.shape[a] > 1]
        while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*spec)


def tree_shardings(tree: Any, axes_tree: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of `tree` from its logical axes (same structure)."""
    return jax.tree_util.tree_map(
        lambda x, axes: NamedSharding(mesh, logical_spec(axes, x.shape, mesh)), tree, axes_tree,
        is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Rows sharded over the data-parallel axes; `leading_dims` unsharded axes before the rows
    (e.g. the gradient-accumulation axis)."""
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, leading_dims: int = 0) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on the mesh (multi-host safe)."""
    sharding = batch_sharding(mesh, leading_dims)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
