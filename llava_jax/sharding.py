"""Device meshes and the one table that maps logical axis names to mesh axes.

Parameters carry logical `axes` metadata (see `llava_jax.model.layers.param`); activations are
constrained with `constrain(x, axes)`, a no-op outside a mesh context (`jax.set_mesh`). Mesh axes are
named from `data`, `fsdp`, `tensor`; a mesh may have any subset of them, of any sizes.

Any mesh, any axis types. The model is written in the compiler-propagated style (GSPMD): parameters
and inputs are placed by the table below, a few activations are pinned with `constrain`, and XLA
decides the rest (all-gathers for fsdp, reductions for tensor). `jax.make_mesh` builds meshes whose
axes are Explicit by default; under Explicit axes every array's sharding is part of its type and each
contraction over a sharded dimension must name its output sharding, which this model does not do.
Rather than annotate every product, every mesh a user gives is used through `auto_view(mesh)`: the
same devices and axis names with Auto axis types. Placing arrays on, and tracing under, that view
gives one program for all three ways of building a mesh (`jax.make_mesh` Explicit or Auto,
`make_mesh` below). Entry points that take a user's mesh (`llava_jax.load`, the trainer) call
`auto_view` once; `use_mesh` is the context manager to run the model under.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llava_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); names missing here are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all by default); -1 takes what is left."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    sizes = [devices.size // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != devices.size:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not use exactly the {devices.size} devices")
    return Mesh(devices.reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def auto_view(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis Auto (see the module docstring).

    Raises ConfigError for an axis not named from MESH_AXES (it would be silently replicated)."""
    unknown = [name for name in mesh.axis_names if name not in MESH_AXES]
    if unknown:
        raise ConfigError(
            f"mesh axes {unknown} are not known; name the axes from {MESH_AXES}, e.g. "
            "jax.make_mesh((1, 8, 1), ('data', 'fsdp', 'tensor'))"
        )
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def use_mesh(mesh: Mesh | None):
    """Context manager that runs the model on `mesh` (through its Auto view); no-op for None."""
    return jax.set_mesh(auto_view(mesh)) if mesh is not None else contextlib.nullcontext()


def logical_to_spec(axes: tuple[str | None, ...], mesh: Mesh | Any, shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes` on `mesh`; a dimension that the mesh axes do not divide, or
    a mesh axis already used by an earlier dimension, stays replicated."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = LOGICAL_RULES.get(name) if name else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t in mesh.axis_names and mesh.shape[t] > 1 and t not in used)
        size = math.prod(mesh.shape[t] for t in targets)
        if not targets or (shape is not None and shape[i] % size):
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; no-op without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, x.shape))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable of an (abstract) nnx state, from its `axes` metadata, on the
    Auto view of `mesh`."""
    mesh = auto_view(mesh)

    def sharding(v):
        axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
        return NamedSharding(mesh, logical_to_spec(axes, mesh, v.shape))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """`make_module()` (e.g. `lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))`) with its parameters created
    directly in their shards on `mesh`: the initialisers run inside one jitted program whose outputs are
    laid out by `state_shardings`, so no parameter is ever whole on one device. The values equal an
    unsharded `make_module()` (JAX's partitionable threefry draws the same numbers however the
    array is split)."""
    if mesh is None:
        return make_module()
    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    shardings = state_shardings(abstract, mesh)
    with use_mesh(mesh):
        state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def bytes_per_device(abstract: nnx.State, mesh: Mesh) -> int:
    """The largest number of bytes that the variables of `abstract` (shapes and dtypes only) place on
    one device of `mesh` by `state_shardings`."""
    shardings = state_shardings(abstract, mesh)
    per_device = {d: 0 for d in mesh.devices.flat}
    for var, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        for device, index in sharding.devices_indices_map(tuple(var.shape)).items():
            n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, var.shape))
            per_device[device] += n * np.dtype(var.dtype).itemsize
    return max(per_device.values())


def optimizer_state_shardings(abstract_state, params, mesh: Mesh):
    """Shardings of an optax state: every leaf that mirrors a parameter (Adam's moments, ...) laid out
    as that parameter, the rest (counts, scalars) replicated. Left to itself, jit replicates freshly
    created optimizer state on every device, which undoes fsdp for the largest part of a train state.

    abstract_state: `jax.eval_shape(optimizer.init, params)`; params: the parameter tree whose leaves
    carry `.sharding` (arrays, or ShapeDtypeStructs with shardings). A state leaf mirrors the parameter
    whose key path ends its own key path, with the same shape (how optax nests moments: mu/<params>)."""
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(auto_view(mesh), PartitionSpec())

    def sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            param = by_path.get(path[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)
