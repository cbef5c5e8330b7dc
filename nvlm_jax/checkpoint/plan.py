"""The streaming conversion plan: every source tensor mapped through the one table in
`nvlm_jax/weight_map.py` to its slot in our params, every problem (missing, unexpected, wrong
shape, non-zero dummy heads) collected and raised once, before any data is read. Each of our
params becomes a `StreamedParam` that produces its data slab by slab (one layer of a stacked
param at a time) or block by block (sharded writes) straight from the memory-mapped sources.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nvlm_jax import weight_map as wm
from nvlm_jax.checkpoint.copying import Bounds, _is_view_of, copy_tensor, read_strided
from nvlm_jax.checkpoint.folders import HF_CONFIG_FILE, read_json
from nvlm_jax.checkpoint.hf_folder import (
    SafetensorsCheckpoint,
    detect_layout,
    infer_dummy_heads,
    open_safetensors,
    refuse_pickles,
    tokenizer_special_ids,
)
from nvlm_jax.checkpoint.paths import local_path
from nvlm_jax.checkpoint.progress import Progress
from nvlm_jax.checkpoint.restore import float_dtype, hf_prompt_format, with_dtype
from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.safetensors_io import SafetensorsFile, dtype_tag


@dataclasses.dataclass
class SourceSlot:
    """One source tensor and how it lands in (a part of) one layer slab of our param."""

    key: str
    file: SafetensorsFile
    transform: wm.Transform
    part: tuple | None
    cfg: NVLMConfig  # head counts of the checkpoint's own layout
    head_axis: int | None  # head axis of the transformed tensor, for dummy-head handling
    heads: int  # heads our param has on that axis
    check_finite: bool = False  # raise NonFiniteError when a copied value is NaN or ±Inf

    @property
    def nbytes(self) -> int:
        return self.file.info(self.key).nbytes

    def view(self, w: np.ndarray) -> np.ndarray:
        """The source tensor `w` in our layout (a view of `w` unless heads are padded)."""
        x = self.transform(w, self.cfg)
        if self.head_axis is not None:
            x = wm.resize_heads(x, self.head_axis, self.heads)
        return x

    def copy_into(self, dst: np.ndarray) -> None:
        copy_tensor(dst, self.file, self.key, self.view)
        if self.check_finite:
            self._check_finite(dst)

    def _check_finite(self, x: np.ndarray) -> None:
        bad = count_nonfinite(x)
        if bad:
            raise NonFiniteError(f"tensor {self.key!r} ({self.file.path}) holds {bad} non-finite values (NaN or "
                                 "Inf) in what was read of it; pass check_finite=False (--nocheck_finite) to "
                                 "accept them")

    def read_region(self, bounds: Bounds, dst: np.ndarray) -> int:
        """Copies what this slot holds of the per-layer block `bounds` of our param into `dst`
        (that block, cast to its dtype), reading only the source bytes the block covers.

        Returns the source bytes read. Heads past the source's own (padding) are left alone;
        `dst` starts out zero.
        """
        src_bounds, dst_index, free = [], [], []  # free: dst axes that are axes of the slot's view
        for axis, (start, stop) in enumerate(bounds):
            p = self.part[axis] if self.part is not None and axis < len(self.part) else slice(None)
            if isinstance(p, (int, np.integer)):  # this slot fills one index of that axis
                if not start <= p < stop:
                    return 0
                dst_index.append(int(p) - start)
            elif p == slice(None):
                src_bounds.append((start, stop))
                dst_index.append(slice(None))
                free.append(axis)
            else:
                raise ValueError(f"{self.key!r}: cannot read a block of part {self.part} (only ints and ':')")
        mapped = self.file.tensor(self.key)
        view = self.transform(mapped, self.cfg)
        if self.head_axis is not None:
            start, stop = src_bounds[self.head_axis]
            stop = min(stop, view.shape[self.head_axis])  # past the source's heads: zero padding
            if stop <= start:
                return 0
            src_bounds[self.head_axis] = (start, stop)
            dst_index[free[self.head_axis]] = slice(0, stop - start)
        sub = view[tuple(slice(a, b) for a, b in src_bounds)]
        if sub.size == 0:
            return 0
        if _is_view_of(sub, mapped):
            data = read_strided(self.file, self.key, sub, mapped)
            nbytes = data.nbytes
        else:  # the transform copied (none of ours does): the whole tensor was read
            data, nbytes = np.asarray(sub), self.nbytes
        dst[tuple(dst_index)] = data
        if self.check_finite:
            self._check_finite(dst[tuple(dst_index)])
        return nbytes


class NonFiniteError(ValueError):
    """A source weight holds NaN or ±Inf (found while streaming it, with `check_finite`)."""


FINITE_BLOCK_BYTES = 16 * 1024**2


def count_nonfinite(x: np.ndarray) -> int:
    """How many values of `x` are NaN or ±Inf, checked in blocks of leading-axis rows of about
    `FINITE_BLOCK_BYTES` (the bool mask never covers a whole large slab)."""
    if x.ndim == 0 or x.size == 0:
        return int(x.size - np.count_nonzero(np.isfinite(x)))
    rows = max(1, FINITE_BLOCK_BYTES // max(1, x[0].nbytes))
    return sum(int(x[i : i + rows].size - np.count_nonzero(np.isfinite(x[i : i + rows])))
               for i in range(0, x.shape[0], rows))


class StreamedParam(abc.ABC):
    """A param produced slab by slab (one layer of a stacked param at a time).

    Subclasses implement `slab(layer)`; `slabs()` yields `(index, array)` covering the param,
    `materialize()` assembles it in memory.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    layered: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def slab_nbytes(self) -> int:
        return self.nbytes // self.shape[0] if self.layered else self.nbytes

    @abc.abstractmethod
    def slab(self, layer: int | None) -> np.ndarray:
        """Layer `layer` of a layered param (its shape without axis 0), or the whole param (None)."""

    def slabs(self) -> Iterator[tuple[tuple, np.ndarray]]:
        if self.layered:
            for i in range(self.shape[0]):
                yield (slice(i, i + 1),), self.slab(i)[None]
        else:
            yield (), self.slab(None)

    def materialize(self) -> np.ndarray:
        if not self.layered:
            return self.slab(None)
        out = np.empty(self.shape, self.dtype)
        for i in range(self.shape[0]):
            out[i] = self.slab(i)
        return out

    @abc.abstractmethod
    def shard(self, bounds: Bounds) -> tuple[np.ndarray, int]:
        """The block `bounds` ((start, stop) per axis) of the param and the source bytes read for it."""


class MappedParam(StreamedParam):
    """A param filled from source tensors through the weight map."""

    def __init__(self, path, shape, dtype, layered: bool, progress: Callable[[int], None] | None = None):
        self.path, self.shape, self.dtype, self.layered = tuple(path), tuple(shape), np.dtype(dtype), layered
        self.slots: dict[int | None, list[SourceSlot]] = {}
        self.progress = progress

    def slab(self, layer: int | None) -> np.ndarray:
        shape = self.shape[1:] if self.layered else self.shape
        out = np.empty(shape, self.dtype)
        for s in self.slots[layer]:
            s.copy_into(out[s.part] if s.part is not None else out)
            if self.progress is not None:
                self.progress(s.nbytes)
        return out

    def shard(self, bounds: Bounds) -> tuple[np.ndarray, int]:
        # Zeros, not empty: padded dummy heads have no source and must read as 0.
        out = np.zeros(tuple(b - a for a, b in bounds), self.dtype)
        nbytes = 0
        if not self.layered:
            for s in self.slots[None]:
                nbytes += s.read_region(bounds, out)
            return out, nbytes
        (first, last), rest = bounds[0], bounds[1:]
        for layer in range(first, last):
            for s in self.slots[layer]:
                nbytes += s.read_region(rest, out[layer - first])
        return out, nbytes


class ArrayParam(StreamedParam):
    """A param already in memory (e.g. a freshly initialised projector)."""

    def __init__(self, path, array: np.ndarray, layered: bool = False):
        self.path, self.array, self.layered = tuple(path), np.asarray(array), layered
        self.shape, self.dtype = tuple(self.array.shape), self.array.dtype

    def slab(self, layer: int | None) -> np.ndarray:
        return self.array if layer is None else self.array[layer]

    def shard(self, bounds: Bounds) -> tuple[np.ndarray, int]:
        return np.array(self.array[tuple(slice(a, b) for a, b in bounds)]), 0


def zero_view(shape: Sequence[int]) -> np.ndarray:
    """A zero-memory int8 array of `shape` (all strides 0), for computing index shapes."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), tuple(shape), (0,) * len(shape))


def _part_id(part: tuple | None) -> str:
    return repr(part)


@dataclasses.dataclass
class Source:
    """One checkpoint feeding (a subtree of) our params."""

    layout: str
    ckpt: SafetensorsCheckpoint
    cfg: NVLMConfig  # the checkpoint's own head layout
    subtree: tuple[str, ...] | None = None


def plan_params(
    sources: Sequence[Source],
    shapes: Mapping,
    problems: list[str],
    progress: Callable[[int], None] | None = None,
    check_finite: bool = True,
) -> dict[tuple[str, ...], MappedParam]:
    """Maps every source tensor to its slot in our params; appends every problem found.

    `shapes`: our params' `ShapeDtypeStruct` tree (its dtypes are the target dtypes). Checks:
    unexpected keys, keys for params the model lacks, layer indices out of range, wrong shapes,
    integer or bool tensors for float params, two keys for one slot, params/layers/parts no key
    fills, and (reading only those tensors) that dummy ViT heads are exactly zero.
    `check_finite`: the params raise `NonFiniteError` naming the first NaN/Inf tensor they read.
    """
    params: dict[tuple[str, ...], MappedParam] = {}
    shape_cache: dict[tuple, tuple[int, ...] | str] = {}
    filled: dict[tuple, str] = {}  # (path, layer, part) → key
    dummy_checks: list[tuple[SourceSlot, int, int]] = []
    for src in sources:
        compiled = wm.compile_rules(src.layout)
        for key, file in src.ckpt.key_to_file.items():
            target = wm.match(key, compiled)
            where = f"{key!r} ({file.path.name})"
            if target is None:
                problems.append(f"unexpected key {where}")
                continue
            path = target.path
            leaf = wm.tree_get(shapes, path)
            if leaf is None or (src.subtree and path[: len(src.subtree)] != tuple(src.subtree)):
                problems.append(f"key {where} maps to {'/'.join(path)}, which this model does not have")
                continue
            layered = target.layer is not None
            if layered and target.layer >= leaf.shape[0]:
                problems.append(f"key {where}: layer {target.layer} >= {leaf.shape[0]} layers")
                continue
            slab_shape = tuple(leaf.shape[1:] if layered else leaf.shape)
            want = zero_view(slab_shape)[target.part].shape if target.part is not None else slab_shape
            info = file.info(key)
            if info.dtype.kind in "biu" and jnp.issubdtype(leaf.dtype, jnp.floating):
                problems.append(f"key {where}: stored as {dtype_tag(info.dtype)}, an integer/bool type, but "
                                f"{'/'.join(path)} is a float weight (a re-tagged header?)")
                continue
            cache_key = (src.layout, id(src.cfg), target.transform.name, info.shape)
            if cache_key not in shape_cache:
                try:
                    out = jax.eval_shape(
                        lambda w, t=target.transform, c=src.cfg: t(w, c), jax.ShapeDtypeStruct(info.shape, np.float32)
                    )
                    shape_cache[cache_key] = tuple(out.shape)
                except (TypeError, ValueError) as e:
                    shape_cache[cache_key] = f"cannot be laid out as {want}: {str(e).splitlines()[0]}"
            got = shape_cache[cache_key]
            axis = wm.head_axis(path, target.part)
            if isinstance(got, tuple) and axis is not None and len(got) > axis:
                src_heads = got[axis]
                got = got[:axis] + (want[axis] if axis < len(want) else src_heads,) + got[axis + 1 :]
            if isinstance(got, str) or got != want:
                detail = got if isinstance(got, str) else f"gives {got}, expected {want}"
                problems.append(f"key {where}: shape {info.shape} {detail} for {'/'.join(path)}")
                continue
            slot_id = (path, target.layer, _part_id(target.part))
            if slot_id in filled:
                problems.append(f"keys {filled[slot_id]!r} and {key!r} both fill {'/'.join(path)}")
                continue
            filled[slot_id] = key
            param = params.get(path)
            if param is None:
                param = params[path] = MappedParam(path, leaf.shape, leaf.dtype, layered, progress)
            slot = SourceSlot(key, file, target.transform, target.part, src.cfg, axis,
                              want[axis] if axis is not None else 0, check_finite)
            param.slots.setdefault(target.layer, []).append(slot)
            if axis is not None and src.cfg.vision.num_dummy_heads:
                dummy_checks.append((slot, src.cfg.vision.num_heads, src.cfg.vision.total_heads))
        _check_coverage(src, shapes, params, problems)
    if not problems:
        for slot, real, total in dummy_checks:
            _check_dummy_heads(slot, real, total, problems)
    return params


def _check_coverage(src: Source, shapes: Mapping, params: Mapping, problems: list[str]) -> None:
    """Every param of the source's part of the tree must be filled in every layer and part."""
    parts: dict[tuple[str, ...], set[str]] = {}
    for rule in wm.rules_for(src.layout):
        parts.setdefault(rule.path, set()).add(_part_id(rule.part))
    root = wm.tree_get(shapes, src.subtree) if src.subtree else shapes
    for kp, leaf in jax.tree_util.tree_flatten_with_path(root)[0]:
        path = tuple(src.subtree or ()) + tuple(str(getattr(k, "key", k)) for k in kp)
        name = "/".join(path)
        param = params.get(path)
        if path not in parts:
            problems.append(f"missing param {name}: the {src.layout} layout has no key for it")
            continue
        if param is None:
            problems.append(f"missing param {name} (no checkpoint key maps to it)")
            continue
        layers = range(leaf.shape[0]) if param.layered else [None]
        need = parts[path]
        short = [i for i in layers if {_part_id(s.part) for s in param.slots.get(i, [])} != need]
        if short:
            what = f"layers {short}" if param.layered else "some of its parts"
            problems.append(f"missing param {name} for {what}")


def _check_dummy_heads(slot: SourceSlot, real: int, total: int, problems: list[str]) -> None:
    x = slot.transform(slot.file.tensor(slot.key), slot.cfg)
    dummy = np.asarray(x[wm.heads_slice(x.ndim, slot.head_axis, real, total)], np.float32)
    bad = np.count_nonzero(dummy)
    if bad:
        problems.append(
            f"key {slot.key!r} ({slot.file.path.name}): dummy heads {real}..{total - 1} must be exactly zero, "
            f"found {bad} non-zero values (max |x| = {float(np.max(np.abs(dummy))):.3g})"
        )


def raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{len(problems)} problem(s) converting {what}:\n  " + "\n  ".join(problems))


def abstract_shapes(cfg: NVLMConfig):
    return nn.meta.unbox(nvlm_model.abstract_params(cfg))


def with_dummy_heads(cfg: NVLMConfig, n: int) -> NVLMConfig:
    return cfg.replace(vision=dataclasses.replace(cfg.vision, num_dummy_heads=n))


@dataclasses.dataclass
class ConversionPlan:
    """Everything `convert`/`load_hf_params` need, validated.

    Attributes:
      cfg: our config for the converted params (dtype/param_dtype = the target dtype).
      params: our param path → `StreamedParam`.
      folders: the source folders (tokenizer files are copied from them).
      total_bytes / total_tensors: source data to read (for progress and throughput).
      progress: the progress counter the params report to.
      prompt_format: the prompt format written with the params (None: the model's).
    """

    cfg: NVLMConfig
    params: dict[tuple[str, ...], StreamedParam]
    folders: list[Path]
    total_bytes: int
    total_tensors: int
    progress: Progress | None = None
    prompt_format: PromptFormat | None = None

    def tree(self) -> dict:
        out: dict = {}
        for path, p in self.params.items():
            wm.tree_set(out, path, p)
        return out


def plan_nvlm(
    hf_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    drop_dummy_heads: bool = False,
    progress: bool = False,
    check_finite: bool = True,
) -> ConversionPlan:
    """Validates an NVLM-D release-layout folder and plans its conversion (reads no weights,
    except the dummy-head slices it verifies). Raises one ValueError listing every problem.
    `check_finite`: reading a NaN/Inf weight raises `NonFiniteError` naming it."""
    float_dtype(dtype)  # before anything is read
    folder = local_path(hf_dir, "a Hugging Face folder to import")
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    refuse_pickles(folder)
    if not (folder / HF_CONFIG_FILE).is_file():
        raise ValueError(f"{folder}: no {HF_CONFIG_FILE}")
    hf_cfg = read_json(folder / HF_CONFIG_FILE)
    layout = detect_layout(hf_cfg, str(folder / HF_CONFIG_FILE))
    if layout != "nvlm":
        raise ValueError(
            f"{folder}: a standalone {layout} checkpoint, not an NVLM model; use `assemble` "
            "(--vit_dir/--llm_dir) to build an NVLM checkpoint from one"
        )
    ckpt, problems = open_safetensors(folder)
    src_cfg = NVLMConfig.from_hf(hf_cfg)
    special = tokenizer_special_ids(folder)
    if special is not None:
        src_cfg = src_cfg.replace(image_context_token_id=special.vision_pad)
    elif "img_context_token_id" in hf_cfg:
        src_cfg = src_cfg.replace(image_context_token_id=int(hf_cfg["img_context_token_id"]))
    dummy = infer_dummy_heads(ckpt, src_cfg, "vision_model.")
    if dummy is not None:
        src_cfg = with_dummy_heads(src_cfg, dummy)
    if not 0 <= src_cfg.image_context_token_id < src_cfg.llm.vocab_size:
        problems.append(
            f"image context token id {src_cfg.image_context_token_id} is outside the vocabulary "
            f"({src_cfg.llm.vocab_size} rows)"
        )
    cfg = with_dtype(src_cfg, dtype)
    if drop_dummy_heads:
        cfg = with_dummy_heads(cfg, 0)
    plan = finish_plan([Source("nvlm", ckpt, src_cfg)], cfg, problems, [folder], progress, str(folder),
                       check_finite=check_finite)
    return dataclasses.replace(plan, prompt_format=hf_prompt_format(hf_cfg, src_cfg))


def finish_plan(sources, cfg, problems, folders, progress, what, extra=None, check_finite: bool = True
                ) -> ConversionPlan:
    total_bytes = sum(s.ckpt.total_bytes for s in sources)
    total_tensors = sum(len(s.ckpt.key_to_file) for s in sources)
    bar = Progress(total_tensors, total_bytes, progress, desc="convert")
    params: dict = plan_params(sources, abstract_shapes(cfg), problems, progress=bar.update,
                               check_finite=check_finite)
    raise_problems(problems, what)
    for path, arr in (extra or {}).items():
        params[path] = ArrayParam(path, arr)
    return ConversionPlan(cfg, params, folders, total_bytes, total_tensors, bar)


