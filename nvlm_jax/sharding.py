"""The one table that maps logical axis names to mesh axes, and mesh/param sharding helpers.

Model code only names logical axes (`"embed"`, `"mlp"`, ...). Which mesh axis each of them uses
is decided here, so changing the parallelism of a run is a change of rules, never of model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from flax.core import meta

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes or None). The first rule whose mesh axes are still free wins.
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # LLM parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("layer_groups", None),
    ("norm", None),
    # Vision encoder parameters
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_head_dim", None),
    ("vit_qkv", None),
    ("vit_positions", None),
    ("vit_layers", None),
    # Projector parameters
    ("proj_in", "fsdp"),
    ("proj_hidden", "tensor"),
    # LoRA adapters: the rank axis is small; the adapter's other axes follow its kernel's
    ("lora_rank", None),
    # Quantized kernels' scales: size-1 input axes (int8) and input groups (int4) stay whole
    ("quant_in", None),
    ("quant_groups", None),
    # Activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_tiles", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def replicate_vision_over(axis: str, rules: LogicalRules = DEFAULT_RULES) -> LogicalRules:
    """Rules in which the ViT's parameters do not use mesh `axis` (e.g. "tensor": a ViT whose
    head count does not divide the tensor axis runs tensor-replicated while the LLM stays split)."""
    out = []
    for name, axes in rules:
        if name.startswith("vit_") and axes is not None:
            kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a != axis)
            axes = kept[0] if len(kept) == 1 else (kept or None)
        out.append((name, axes))
    return tuple(out)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A `(data, fsdp, tensor)` mesh with Auto axis types; one size may be -1 (= the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )


def _mesh_axes_size(mesh: jax.sharding.Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_sharding(
    shape: Sequence[int],
    names: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    what: str = "array",
) -> jax.sharding.NamedSharding:
    """The NamedSharding for an array of `shape` whose axes carry logical `names`.

    Raises a ValueError naming `what`, the axis and the sizes when a dimension does not divide
    evenly over its mesh axes.
    """
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    for dim, (size, name, axes) in enumerate(zip(shape, names, spec, strict=True)):
        n = _mesh_axes_size(mesh, axes)
        if size % n:
            raise ValueError(
                f"{what}: dimension {dim} ({name!r}, size {size}) does not divide over mesh "
                f"axes {axes} of size {n}"
            )
    return jax.sharding.NamedSharding(mesh, spec)


def tree_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Shardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from `jax.eval_shape(init)`).

    Returns a tree of the same (unboxed) structure. Unannotated leaves are replicated. Raises one
    ValueError listing every parameter that does not divide over its mesh axes.
    """
    problems = []

    def one(path, leaf):
        what = "/".join(str(getattr(k, "key", k)) for k in path)
        if isinstance(leaf, meta.Partitioned):
            try:
                return logical_sharding(leaf.value.shape, leaf.names, mesh, rules, what)
            except ValueError as e:
                problems.append(str(e))
                return None
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    out = jax.tree_util.tree_map_with_path(one, boxed_tree, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    if problems:
        shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
        raise ValueError(f"{len(problems)} parameter(s) cannot be sharded over mesh ({shape}):\n  "
                         + "\n  ".join(problems))
    return out


def logical_names(boxed_tree):
    """The tree of logical axis-name tuples (None for unannotated leaves)."""
    return jax.tree_util.tree_map(
        lambda x: tuple(x.names) if isinstance(x, meta.Partitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, meta.Partitioned),
    )
