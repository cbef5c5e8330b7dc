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

    def __init__(self, source: StreamedParam, path, which: str, scale_shape, mode: str, scales: dict,
                 order: tuple[int, ...]):
        self.source, self.path, self.which, self.mode = source, tuple(path), which, mode
        self.scale_shape, self.scales = tuple(scale_shape), scales
        self.layered = source.layered
        # kernel_q is stored out-major (`q_lib.out_major`): `order` permutes the whole source
        # kernel's axes (a layer axis stays first); `_slab_order` does it for one layer's slab.
        self._slab_order = tuple(i - 1 for i in order[1:]) if self.layered else tuple(order)
        self.shape = tuple(source.shape[i] for i in order) if which == "kernel_q" else self.scale_shape
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
        return np.ascontiguousarray(q.transpose(self._slab_order)), scale

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


def kernel_paths(cfg: NVLMConfig, mode: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
    """Path of each Linear's float `kernel` -> (its scale shape, the axis order taking the kernel
    to its out-major `kernel_q`), from the model's abstract trees without and with `mode`."""
    def boxed(c):
        flat = jax.tree_util.tree_leaves_with_path(c, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
        return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}

    plain, quant = boxed(nvlm_model.abstract_params(cfg)), boxed(nvlm_model.abstract_params(cfg.replace(quantize=mode)))
    out = {}
    for path, scale in quant.items():
        if path[-1] != "kernel_scale":
            continue
        kernel, q = plain[path[:-1] + ("kernel",)], quant[path[:-1] + ("kernel_q",)]
        out[path[:-1] + ("kernel",)] = (tuple(scale.value.shape), _out_major_order(kernel, q, path))
    return out


def _out_major_order(kernel, q, path) -> tuple[int, ...]:
    """The one axis order (stacked-layer axes first, then out, then in) that takes the boxed
    `kernel` to the boxed `kernel_q`, by shapes and logical names."""
    n, shape, names = kernel.value.ndim, kernel.value.shape, tuple(kernel.names)
    found = set()
    for lead in range(n - 1):
        for in_dims in range(1, n - lead):
            order = q_lib.out_major_order(n, in_dims, lead)
            if (tuple(shape[i] for i in order) == tuple(q.value.shape)
                    and tuple(names[i] for i in order) == tuple(q.names)):
                found.add(order)
    if len(found) != 1:
        raise ValueError(f"{'/'.join(path)}: cannot tell how kernel {shape} {names} maps to kernel_q "
                         f"{q.value.shape} {tuple(q.names)} ({len(found)} axis orders fit)")
    return found.pop()


def quantize_plan(plan: ConversionPlan, mode: str) -> ConversionPlan:
    """`plan` with every Linear kernel streamed as `kernel_q` + `kernel_scale` of `mode`."""
    q_lib.check_mode(mode)
    if plan.cfg.quantize is not None:
        raise ValueError(f"the plan is already quantized ({plan.cfg.quantize})")
    cfg = plan.cfg.replace(quantize=mode)
    kernels = kernel_paths(plan.cfg, mode)
    params: dict[tuple[str, ...], StreamedParam] = {}
    for path, p in plan.params.items():
        if path not in kernels:
            params[path] = p
            continue
        scales: dict = {}
        scale_shape, order = kernels[path]
        for which in q_lib.QUANT_LEAVES:
            params[path[:-1] + (which,)] = QuantizedParam(p, path[:-1] + (which,), which, scale_shape, mode, scales,
                                                          order)
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
    for path, (scale_shape, order) in kernel_paths(cfg, mode).items():
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
        quant = jax.jit(lambda w, s=scale_shape, o=order: _quantize_stacked(w, s, mode, o), out_shardings=target)
        parent["kernel_q"], parent["kernel_scale"] = quant(kernel)
        kernel.delete()
    return qcfg, out


def _quantize_stacked(w: jax.Array, scale_shape: tuple[int, ...], mode: str, order: tuple[int, ...]):
    """`quantize_array` one leading slice at a time for stacked kernels (float32 temporaries of
    one layer, not of the whole stack); the int values come back in the stored `order`."""
    if w.ndim >= 3 and scale_shape[0] == w.shape[0] and w.shape[0] > 1:
        q, scale = jax.lax.map(lambda x: q_lib.quantize_array(x, scale_shape[1:], mode, xp=jnp), w)
    else:
        q, scale = q_lib.quantize_array(w, scale_shape, mode, xp=jnp)
    return q.transpose(order), scale
