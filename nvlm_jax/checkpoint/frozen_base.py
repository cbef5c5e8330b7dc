"""The frozen base of a LoRA training checkpoint: where it comes from and its fingerprint.

A LoRA run's training checkpoints hold only its trainable params (the adapters and any part the
stage trains fully, e.g. NVLM-D's projector in sft), its optimizer state and counters; the frozen
base (e.g. ~159 GB of NVLM-D-72B weights) is not written again at every save. It is re-created
from the run's own init source, which the checkpoint's run config records under `RECORD_KEY`:

    {"init": {"checkpoint": absolute path or "" (= the seeded random init), "config_json",
              "allow_missing"},
     "seed": the init seed, "leaves": frozen leaf count, "fingerprint": "<hex>"}

and the re-created base is only used when its fingerprint is the recorded one, so an init
checkpoint that was overwritten since (e.g. a newer `runs/main`) is refused
(`BaseMismatchError`), never silently trained or served on a different base.

The fingerprint is exact and cheap: per leaf, two position-weighted uint32 sums over the raw
bits (computed jitted on the leaves' own devices, in integer arithmetic so any reduction order
or sharding gives the same number), hashed with every leaf's path, shape and dtype. Any changed
bit, moved value, shape or dtype changes it; f64 sums would need x64 and can miss bit flips below
their rounding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax.checkpoint.paths import is_remote

RECORD_KEY = "frozen_base"


class BaseMismatchError(ValueError):
    """The frozen base re-created for a LoRA checkpoint is not the one it was trained on."""


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def leaf_paths(tree: Any) -> list[str]:
    """The "a/b/c" paths of the leaves of a nested dict (None entries are no leaves)."""
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def select(tree: Mapping[str, Any], paths: set[str] | frozenset[str], keep: bool = True, _prefix: str = "") -> dict:
    """The nested dict of the leaves of `tree` whose path is in `paths` (`keep`) or is not
    (not `keep`); dicts left empty are dropped."""
    out = {}
    for key, value in tree.items():
        name = f"{_prefix}{key}"
        if isinstance(value, Mapping):
            sub = select(value, paths, keep, f"{name}/")
            if sub:
                out[key] = sub
        elif value is not None and (name in paths) == keep:
            out[key] = value
    return out


def overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """`base` with the leaves of `top` added at their paths (nested dicts merged)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = overlay(out[key], value)
        else:
            out[key] = value
    return out


def absolute(path: str | os.PathLike | None) -> str:
    """A local path made absolute (so a checkpoint naming it is read the same from any folder);
    "" and remote URLs as they are."""
    if not path:
        return ""
    text = os.fspath(path)
    return text if is_remote(text) or text.startswith("file://") else os.path.abspath(text)


def init_record(init: Mapping[str, Any] | None) -> dict[str, Any]:
    """The init part of a record from a run config's `init` section (paths made absolute)."""
    init = init or {}
    return {"checkpoint": absolute(init.get("checkpoint")), "config_json": absolute(init.get("config_json")),
            "allow_missing": bool(init.get("allow_missing", False))}


def describe(record: Mapping[str, Any]) -> str:
    """E.g. "init checkpoint /runs/main (seed 0)" or "the random init of seed 0"."""
    init = record.get("init") or {}
    seed = record.get("seed")
    if init.get("checkpoint"):
        return f"init checkpoint {init['checkpoint']} (seed {seed})"
    return f"the random init of seed {seed}"


# ---- the fingerprint ---------------------------------------------------------------------------------

_GOLDEN = np.uint32(0x9E3779B1)


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (8-byte values as two words on a trailing axis)."""
    size = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size in (1, 2, 4):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise ValueError(f"cannot fingerprint a leaf of dtype {x.dtype}")


def _leaf_sums(x: jax.Array) -> jax.Array:
    """uint32[2]: sum(bits * (2w+1)) and sum(mix(bits ^ w)), w the element's flat position
    (mod 2^32, from per-axis iotas: no reshape of a sharded array)."""
    b = _bits(x)
    w = jnp.zeros(b.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(b.ndim)):
        w = w + jax.lax.broadcasted_iota(jnp.uint32, b.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= b.shape[axis]
    h = (b ^ w) * _GOLDEN
    h = h ^ (h >> 15)
    return jnp.stack([jnp.sum(b * (2 * w + 1), dtype=jnp.uint32), jnp.sum(h, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> str:
    """The hex fingerprint of a params tree (see the module docstring)."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    sums = _all_sums([x for _, x in flat])
    if not sums.is_fully_addressable:
        from jax.experimental import multihost_utils

        sums = multihost_utils.process_allgather(sums, tiled=True)
    sums = np.asarray(jax.device_get(sums))
    h = hashlib.sha256()
    for (path, x), (s1, s2) in zip(flat, sums, strict=True):
        h.update(f"{path_str(path)}|{tuple(x.shape)}|{jnp.dtype(x.dtype).name}|{int(s1)}|{int(s2)};".encode())
    return h.hexdigest()


def make_record(frozen: Any, init: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """The record saved with a LoRA run's checkpoints for its frozen params `frozen`."""
    return {"init": init_record(init), "seed": int(seed), "leaves": len(jax.tree_util.tree_leaves(frozen)),
            "fingerprint": fingerprint(frozen)}


def check(record: Mapping[str, Any], frozen: Any, where: str) -> None:
    """Raises `BaseMismatchError` naming the init source when `frozen` (the re-created base)
    is not the base recorded in `record`."""
    got = fingerprint(frozen)
    if got != record.get("fingerprint"):
        init = (record.get("init") or {}).get("checkpoint")
        fix = (f"{init} was changed or overwritten since this run started (e.g. a newer run in that folder); "
               "put the original back there, or start the LoRA run again in a new workdir" if init else
               "the random init differs (another model config or JAX version); start the run again in a new workdir")
        raise BaseMismatchError(
            f"{where}: this LoRA checkpoint holds only its trainable params; its frozen base is re-created from "
            f"{describe(record)}, but the re-created base does not match the one the run was trained on "
            f"(fingerprint {got[:16]} != recorded {str(record.get('fingerprint'))[:16]}, "
            f"{len(jax.tree_util.tree_leaves(frozen))} leaves vs {record.get('leaves')}): {fix}")
