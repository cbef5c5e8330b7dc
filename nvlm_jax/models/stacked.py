"""Stacked layers as plain params + `lax.scan`: parameter creation and the scanned call.

Layers keep one stacked param tree (`[layers, ...]`, logical axis "layers") so checkpoints look
the same whatever interleaving the forward uses: NVLM-D scans all decoder layers; NVLM-X/H scan
groups of `xattn_every` layers followed by one cross-attention block, reading the same stack
reshaped to `[groups, xattn_every, ...]`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import linen as nn


def stacked_init(module: nn.Module, count: int, axis_name: str, *args, **kwargs) -> Callable:
    """An initializer for `Module.param` returning `count` independent inits of `module`,
    stacked on a leading axis named `axis_name` (the module must be unbound: `parent=None`)."""

    def init(rng):
        keys = jax.random.split(rng, count)
        tree = jax.vmap(lambda k: module.init(k, *args, **kwargs)["params"])(keys)
        return nn.meta.add_axis(tree, 0, {nn.PARTITION_NAME: axis_name})

    return init


def group_leading(tree, groups: int):
    """Reshapes every leaf `[groups * n, ...]` → `[groups, n, ...]` (None leaves pass)."""
    return jax.tree_util.tree_map(lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:]), tree)
