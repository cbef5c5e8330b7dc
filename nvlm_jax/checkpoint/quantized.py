"""Quantizing checkpoints while they stream: a conversion plan whose Linear kernels become
int8/int4 `kernel_q` + float32 `kernel_scale` (HF import, `convert --quantize`,
`load_pretrained(quantize=...)`), and quantizing params already loaded on devices (converted
folders and training checkpoints stored unquantized).

Host memory: a quantized param is produced one layer slab at a time, in row chunks of at most
`CHUNK_BYTES` of float32 work, so converting or loading quantized needs the quantized param
plus one source slab (`QuantizedParam.slab_nbytes` counts both, for the streamed writer's budget).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nvlm_jax.checkpoint.copying import Bounds
from nvlm_jax.checkpoint.plan import ConversionPlan, StreamedParam
from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.models import quantize as q_lib
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings

CHUNK_BYTES = 16 * 1024**2


def quantize_host(w: np.ndarray, scale_shape: tuple[int, ...], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_array` on the host in chunks along the axis with the most scales (whole tiles per
    chunk), so float32 temporaries stay near `CHUNK_BYTES` whatever the tensor's size."""
    tiles = [n // s for n, s in zip(w.shape, scale_shape, strict=True)]
    axis = int(np.argmax(scale_shape))
    per_scale = max(1, math.prod(w.shape) // scale_shape[axis] * 4)  # f32 bytes of one tile row
    step = max(1, CHUNK_BYTES // per_scale)
    if step >= scale_shape[axis]:
        return q_lib.quantize_array(w, scale_shape, mode)
    q = np.empty(w.shape, q_lib.qdtype(mode))
    scale = np.empty(scale_shape, q_lib.SCALE_DTYPE)
    for s0 in range(0, scale_shape[axis], step):
        s1 = min(s0 + step, scale_shape[axis])
        rows = [slice(None)] * w.ndim
        rows[axis] = slice(s0 * tiles[axis], s1 * tiles[axis])
        srows = [slice(None)] * w.ndim
        srows[axis] = slice(s0, s1)
        part_shape = tuple(scale_shape[:axis]) + (s1 - s0,) + tuple(scale_shape[axis + 1 :])
        q[tuple(rows)], scale[tuple(srows)] = q_lib.quantize_array(w[tuple(rows)], part_shape, mode)
    return q, scale


class QuantizedParam(StreamedParam):
    """`kernel_q` or `kernel_scale` of one float `StreamedParam` kernel, quantized slab by slab.

    The pair shares `scales` (small: float32 scales of every slab quantized so far), so writing
    both reads each source slab once when `kernel_q` is written first.
    """

    def __init__(self, source: StreamedParam, path, which: str, scale_shape, mode: str, scales: dict):
        self.source, self.path, self.which, self.mode = source, tuple(path), which, mode
        self.scale_shape, self.scales = tuple(scale_shape), scales
        self.layered = source.layered
        self.shape = source.shape if which == "kernel_q" else self.scale_shape
        self.dtype = q_lib.qdtype(mode) if which == "kernel_q" else np.dtype(q_lib.SCALE_DTYPE)

    @property
    def slab_nbytes(self) -> int:
        # What producing one slab holds: the source slab and the quantized one. The streamed
        # writer budgets its in-flight slabs by this, so two large quantizations never overlap.
        return self.source.slab_nbytes + super().slab_nbytes

    def _quantized(self, layer: int | None) -> tuple[np.ndarray | None, np.ndarray]:
        if self.which == "kernel_scale" and layer in self.scales:
            return None, self.scales[layer]
        shape = self.scale_shape[1:] if self.layered else self.scale_shape
        q, scale = quantize_host(self.source.slab(layer), shape, self.mode)
        self.scales[layer] = scale
        return q, scale

    def slab(self, layer: int | None) -> np.ndarray:
        q, scale = self._quantized(layer)
        return q if self.which == "kernel_q" else scale

    def shard(self, bounds: Bounds) -> tuple[np.ndarray, int]:
        # A block needs whole scale tiles: quantize the whole slabs it touches, then cut it out.
        layers = range(*bounds[0]) if self.layered else [None]
        slabs = [self.slab(i) for i in layers]
        full = np.stack(slabs) if self.layered else slabs[0]
        inner = bounds[1:] if self.layered else bounds
        cut = (slice(None),) * self.layered + tuple(slice(a, b) for a, b in inner)
        nbytes = self.source.slab_nbytes * len(slabs)
        return np.ascontiguousarray(full[cut]), nbytes


def _kernel_paths(abstract_quantized) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path of each Linear's float `kernel` → its scale shape, from a quantized abstract tree."""
    out = {}
    flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_quantized))
    for path, leaf in flat:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] == "kernel_scale":
            out[keys[:-1] + ("kernel",)] = tuple(leaf.shape)
    return out


def quantize_plan(plan: ConversionPlan, mode: str) -> ConversionPlan:
    """`plan` with every Linear kernel streamed as `kernel_q` + `kernel_scale` of `mode`."""
    q_lib.check_mode(mode)
    if plan.cfg.quantize is not None:
        raise ValueError(f"the plan is already quantized ({plan.cfg.quantize})")
    cfg = plan.cfg.replace(quantize=mode)
    kernels = _kernel_paths(nvlm_model.abstract_params(cfg))
    params: dict[tuple[str, ...], StreamedParam] = {}
    for path, p in plan.params.items():
        if path not in kernels:
            params[path] = p
            continue
        scales: dict = {}
        for which in q_lib.QUANT_LEAVES:
            params[path[:-1] + (which,)] = QuantizedParam(p, path[:-1] + (which,), which, kernels[path], mode, scales)
    missing = sorted("/".join(k) for k in kernels if k not in plan.params)
    if missing:
        raise ValueError(f"quantize={mode}: the plan lacks the kernels {missing}")
    return dataclasses.replace(plan, cfg=cfg, params=params)


def quantize_params(params: dict[str, Any], cfg: NVLMConfig, mode: str, mesh: jax.sharding.Mesh | None = None,
                    rules: LogicalRules = DEFAULT_RULES) -> tuple[NVLMConfig, dict[str, Any]]:
    """`(cfg, params)` with every Linear kernel of `params` (device arrays of an unquantized
    `cfg`) quantized to `mode` on its device(s), one kernel at a time (each float kernel is
    dropped once quantized), placed by the quantized layout's shardings on `mesh`."""
    q_lib.check_mode(mode)
    if cfg.quantize is not None:
        raise ValueError(f"these params are already quantized ({cfg.quantize}); load them with quantize=None "
                         f"or {cfg.quantize!r}")
    qcfg = cfg.replace(quantize=mode)
    abstract = nvlm_model.abstract_params(qcfg)
    shardings = tree_shardings(abstract, mesh, rules) if mesh is not None else None
    out = jax.tree_util.tree_map(lambda x: x, params)  # a new dict tree; leaves shared
    for path, scale_shape in _kernel_paths(abstract).items():
        parent = out
        for k in path[:-1]:
            if not isinstance(parent, dict) or k not in parent:
                raise ValueError(f"quantize={mode}: params lack {'/'.join(path)}")
            parent = parent[k]
        kernel = parent.pop("kernel")
        target = None
        if shardings is not None:
            node = shardings
            for k in path[:-1]:
                node = node[k]
            target = (node["kernel_q"], node["kernel_scale"])
        quant = jax.jit(lambda w, s=scale_shape: _quantize_stacked(w, s, mode), out_shardings=target)
        parent["kernel_q"], parent["kernel_scale"] = quant(kernel)
        kernel.delete()
    return qcfg, out


def _quantize_stacked(w: jax.Array, scale_shape: tuple[int, ...], mode: str):
    """`quantize_array` one leading slice at a time for stacked kernels (float32 temporaries of
    one layer, not of the whole stack)."""
    if w.ndim >= 3 and scale_shape[0] == w.shape[0] and w.shape[0] > 1:
        return jax.lax.map(lambda x: q_lib.quantize_array(x, scale_shape[1:], mode, xp=jnp), w)
    return q_lib.quantize_array(w, scale_shape, mode, xp=jnp)
