"""Checkpoint conversion: Hugging Face safetensors ↔ our Orbax checkpoints.

Import (`convert`): an NVLM-D release folder (`config.json`, `model.safetensors.index.json`,
shards, tokenizer files) → an Orbax checkpoint folder:

    out_dir/params/            Orbax (PyTree) checkpoint of the params, our layout
    out_dir/nvlm_config.json   {"format": "nvlm_jax.orbax", "config": NVLMConfig.to_dict(), ...}
    out_dir/<tokenizer files>  copied verbatim

How it stays at about one tensor of host memory: every shard header is parsed and every key is
mapped through the one table in `weight_map.py` *before* any data is read, so all problems
(missing/unexpected keys, wrong shapes, missing or truncated shards, index entries pointing to
absent tensors, non-zero dummy ViT heads) are reported together and nothing is written. Then
each of our params is a `StreamedParam` that produces its data slab by slab (one layer of a
stacked param at a time) straight from memory-mapped source tensors; the Orbax writer pulls
slabs one at a time (a lock serialises them) and writes them into per-layer chunks. The output
is written under a temporary name and renamed when complete.

Dtypes: tensors are cast to the target dtype with round-to-nearest-even (the release stores
some tensors in float32 and loads them with `torch_dtype=bfloat16`; we do the same cast).
Dummy ViT heads (25 real heads padded to 32 in the release) are verified to be exactly zero;
by default the padded layout is kept (32 heads shard 8 ways), `drop_dummy_heads=True` slices
them away (exact, since they are zero).

Sharded mode (`mesh=` / `--mesh`, for models too big for one host): the same validated plan, but
each param becomes a global `jax.Array` on the mesh whose blocks every process reads straight
from the safetensors (one `pread` per contiguous run of the block, so a process reads only the
bytes of its own shards, never a whole tensor), casts to the target dtype and places on its
devices; Orbax then writes each process's shards from that process, the primary process writes
the metadata, and process 0 alone stages/renames the folder and writes the config and
tokenizer files (barriers between). All processes validate the source and the mesh before
anything is written. Orbax restores the result onto any mesh (`load_our_params`), not only the
one it was written with.

Also here: `load_hf_params` (the same streaming plan, straight onto devices), `export_hf`
(our params → release-layout safetensors + config.json; bit-exact round trip), `assemble`
(a standalone InternViT + a standalone Qwen2/Llama LM → an NVLM checkpoint with a freshly
initialised projector: the starting point of stage-1 training), and the CLI:

    python -m nvlm_jax.convert --hf_dir=DIR --out_dir=DIR [--dtype=bfloat16] [--drop_dummy_heads]
    # Sharded: the same command in each of N processes, with JAX_COORDINATOR_ADDRESS=HOST0:PORT,
    # JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i set (or --coordinator_address/--num_processes/
    # --process_id; one process needs none); out_dir on a file system all processes share:
    python -m nvlm_jax.convert --hf_dir=DIR --out_dir=DIR --mesh=DATA,FSDP,TENSOR
    python -m nvlm_jax.convert --export_from=ORBAX_DIR --out_dir=DIR [--max_shard_size=5GB]
    python -m nvlm_jax.convert --vit_dir=DIR --llm_dir=DIR --out_dir=DIR [--arch=D]

Pickled weights (`.bin`, `.pt`, ...) are never loaded.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from numpy.lib.array_utils import byte_bounds

from nvlm_jax import distributed
from nvlm_jax import weight_map as wm
from nvlm_jax.config import NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh, tree_shardings

HF_CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OUR_CONFIG_FILE = "nvlm_config.json"
PARAMS_DIR = "params"
FORMAT = "nvlm_jax.orbax"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Orbax chunk size target: a stacked param is chunked per layer, then split to ≤ this size.
CHUNK_BYTES = 64 * 1024**2
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


# ---- reading a Hugging Face folder -------------------------------------------------------------


def refuse_pickles(folder: Path) -> None:
    """Raises ValueError when `folder`'s weights exist only as pickles (which we never load)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder}: weights are pickled ({', '.join(pickles[:4])}{', ...' if len(pickles) > 4 else ''}); "
            "nvlm_jax never unpickles checkpoints (unpickling runs arbitrary code). Convert them to "
            "safetensors first, in an environment you trust, e.g.:\n"
            "  python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"\n"
            "or load the model with transformers and call `save_pretrained(dir, safe_serialization=True)`."
        )


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read JSON {path}: {e}") from e


@dataclasses.dataclass
class SafetensorsCheckpoint:
    """The safetensors shards of one folder: which file holds each tensor.

    Attributes:
      folder: the checkpoint folder.
      files: shard file name → parsed file.
      key_to_file: tensor key → the file that holds it (as listed by the index, if any).
    """

    folder: Path
    files: dict[str, SafetensorsFile]
    key_to_file: dict[str, SafetensorsFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.info(k).nbytes for k, f in self.key_to_file.items())


def open_safetensors(folder: str | os.PathLike) -> tuple[SafetensorsCheckpoint, list[str]]:
    """Parses every shard header of `folder` and cross-checks them with the index.

    Returns the checkpoint (whatever could be opened) and the list of problems: missing shard
    files, truncated or corrupt shards, index entries whose shard lacks the tensor, tensors the
    index does not list, a tensor in two shards. Refuses pickled weights (ValueError).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    refuse_pickles(folder)
    problems: list[str] = []
    index_path = folder / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        names = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        if not names:
            raise ValueError(f"{folder}: no {INDEX_FILE} and no *.safetensors files")
    files: dict[str, SafetensorsFile] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            listed = sum(1 for v in (weight_map or {}).values() if v == name)
            problems.append(f"shard file {name} is missing (the index lists {listed} tensors in it)")
            continue
        try:
            files[name] = SafetensorsFile(path)
        except ValueError as e:
            problems.append(str(e))
    key_to_file: dict[str, SafetensorsFile] = {}
    if weight_map is not None:
        for key, name in weight_map.items():
            f = files.get(name)
            if f is None:
                continue
            if key not in f:
                problems.append(f"the index maps {key!r} to {name}, which does not hold that tensor")
                continue
            key_to_file[key] = f
        for name, f in files.items():
            for key in f.keys():
                if key not in weight_map:
                    problems.append(f"{name} holds {key!r}, which the index does not list")
                elif weight_map[key] != name:
                    problems.append(f"{key!r} is in {name} but the index says {weight_map[key]}")
    else:
        for name, f in files.items():
            for key in f.keys():
                if key in key_to_file:
                    problems.append(f"{key!r} is in both {key_to_file[key].path.name} and {name}")
                key_to_file[key] = f
    return SafetensorsCheckpoint(folder, files, key_to_file), problems


def detect_layout(hf_config: Mapping[str, Any], source: str) -> str:
    """Which weight-map layout a HF `config.json` describes: "nvlm", "internvit" or "llm"."""
    model_type = hf_config.get("model_type")
    archs = list(hf_config.get("architectures") or [])
    if model_type == "NVLM_D" or "NVLM_D" in archs:
        return "nvlm"
    if "InternVisionModel" in archs or str(model_type).startswith("intern_vit"):
        return "internvit"
    if set(archs) & {"Qwen2ForCausalLM", "LlamaForCausalLM"}:
        return "llm"
    raise ValueError(
        f"{source}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
        "expected NVLM_D, InternVisionModel, Qwen2ForCausalLM or LlamaForCausalLM"
    )


def _infer_dummy_heads(ckpt: SafetensorsCheckpoint, cfg: NVLMConfig, prefix: str) -> int | None:
    """Dummy ViT heads implied by the stored fused qkv rows (3 · total_heads · head_dim)."""
    f = ckpt.key_to_file.get(prefix + "encoder.layers.0.attn.qkv.weight")
    if f is None:
        return None
    rows = f.info(prefix + "encoder.layers.0.attn.qkv.weight").shape[0]
    total, rem = divmod(rows, 3 * cfg.vision.head_dim)
    if rem or total < cfg.vision.num_heads:
        return None  # reported as a shape problem by the plan
    return total - cfg.vision.num_heads


def tokenizer_special_ids(folder: Path):
    """The tokenizer's `SpecialTokens` if `folder` holds tokenizer files, else None."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    from nvlm_jax.processing import get_special_tokens, load_tokenizer

    return get_special_tokens(load_tokenizer(folder))


# ---- the streaming plan ---------------------------------------------------------------------------


class Progress:
    """Counts converted tensors and bytes; draws a tqdm bar (created on first use) when enabled."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool, desc: str):
        self.total_tensors, self.total_bytes, self.tensors = total_tensors, total_bytes, 0
        self.enabled, self.desc = enabled, desc
        self._lock = threading.Lock()
        self._bar = None

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.tensors += 1
            if not self.enabled:
                return
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc)
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# Large tensors are copied in blocks of about this many source bytes, read with `pread` into a
# reusable buffer, so a tensor never needs to be resident twice (its source and its copy).
READ_BLOCK_BYTES = 16 * 1024**2
# Transposing copies go through (_TILE x _TRANSPOSE_ROWS) tiles (measured best on a 2-core CPU).
_TILE = 128
_TRANSPOSE_ROWS = 256


def _as_2d_pair(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both arrays reshaped to 2-D (leading axes, trailing axes) at a split where neither needs
    a copy, or None."""
    for k in range(1, dst.ndim):
        try:
            d2 = dst.reshape(math.prod(dst.shape[:k]), -1, copy=False)
            s2 = src.reshape(math.prod(src.shape[:k]), -1, copy=False)
        except ValueError:
            continue
        return d2, s2
    return None


def _uint(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def copy_tensor(dst: np.ndarray, file: SafetensorsFile, key: str, view: Callable[[np.ndarray], np.ndarray]) -> None:
    """`dst[...] = view(tensor)` (with round-to-nearest-even casting), streaming the source.

    `view` must only reshape/transpose/slice (the weight-map transforms). When the result is a
    2-D strided view of the stored bytes (all transforms of large tensors are), the source is
    read in blocks of `READ_BLOCK_BYTES` along its storage order into one reusable buffer, and
    transposing copies go through cache-sized tiles (bit copies when the dtype is unchanged).
    Otherwise (small or irregular tensors) it is copied from a memory map.
    """
    mapped = file.tensor(key)  # only its layout is used on the streaming path
    src = view(mapped)
    if dst.nbytes <= READ_BLOCK_BYTES or dst.ndim < 2 or src.size == 0:
        dst[...] = src
        return
    base_lo, base_hi = byte_bounds(mapped)
    lo, hi = byte_bounds(src)
    pair = _as_2d_pair(dst, src) if base_lo <= lo and hi <= base_hi else None
    if pair is None or min(pair[1].strides) <= 0:
        dst[...] = src
        return
    d2, s2 = pair
    if dst.dtype == src.dtype:
        d2 = d2.view(_uint(dst.dtype))
    outer = 0 if s2.strides[0] >= s2.strides[1] else 1  # the axis that walks storage order
    step = max(_TILE, READ_BLOCK_BYTES // s2.strides[outer] // _TILE * _TILE)
    buf = np.empty(step * s2.strides[outer] + s2.strides[1 - outer] * s2.shape[1 - outer], np.uint8)
    read_dtype = _uint(src.dtype) if dst.dtype == src.dtype else src.dtype
    direct = (outer == 0 and dst.dtype == src.dtype and d2.flags.c_contiguous
              and s2.strides == (s2.shape[1] * s2.itemsize, s2.itemsize))
    for o0 in range(0, s2.shape[outer], step):
        block = s2[o0 : o0 + step] if outer == 0 else s2[:, o0 : o0 + step]
        b_lo, b_hi = byte_bounds(block)
        if direct:  # same layout and dtype: read straight into the destination
            file.read_range(key, b_lo - base_lo, d2[o0 : o0 + step])
            continue
        file.read_range(key, b_lo - base_lo, buf[: b_hi - b_lo])
        data = np.lib.stride_tricks.as_strided(buf[: b_hi - b_lo].view(read_dtype), block.shape, block.strides)
        if outer == 0:
            d2[o0 : o0 + step] = data
            continue
        for j in range(0, data.shape[1], _TRANSPOSE_ROWS):
            j1 = min(j + _TRANSPOSE_ROWS, data.shape[1])
            for i in range(0, s2.shape[0], _TILE):
                d2[i : i + _TILE, o0 + j : o0 + j1] = data[i : i + _TILE, j:j1]


# A block of an array: (start, stop) per axis.
Bounds = tuple[tuple[int, int], ...]


def _is_view_of(view: np.ndarray, base: np.ndarray) -> bool:
    """Whether `view` lies inside `base`'s memory with positive strides on its non-trivial axes
    (what `_storage_runs` needs)."""
    lo, hi = byte_bounds(view)
    base_lo, base_hi = byte_bounds(base)
    return base_lo <= lo and hi <= base_hi and all(s > 0 for s, n in zip(view.strides, view.shape, strict=True)
                                                   if n > 1)


def _storage_runs(view: np.ndarray, base: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, int]:
    """How to read a strided `view` of `base` (a tensor's bytes) as a list of contiguous runs.

    Returns `(order, starts, run_bytes)`: `view.transpose(order)` walks storage order (axes by
    decreasing stride); its trailing axes that are contiguous form runs of `run_bytes`, which
    start at byte offsets `starts` (from `base`'s first byte) in C order of the leading axes.
    E.g. a column block [r0:r1, c0:c1] of a row-major matrix is r1 - r0 runs of a row piece each.
    """
    order = tuple(sorted(range(view.ndim), key=lambda a: (view.shape[a] > 1, -view.strides[a])))
    shape = [view.shape[a] for a in order]
    strides = [view.strides[a] for a in order]
    inner, run_bytes = view.ndim, view.itemsize
    while inner > 0 and (shape[inner - 1] == 1 or strides[inner - 1] == run_bytes):
        run_bytes *= shape[inner - 1]
        inner -= 1
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    starts = np.full(1, offset, np.int64)
    for size, stride in zip(shape[:inner], strides[:inner], strict=True):
        starts = (starts[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    return order, starts, run_bytes


def read_strided(file: SafetensorsFile, key: str, view: np.ndarray, base: np.ndarray) -> np.ndarray:
    """`np.array(view)` for a strided view of tensor `key`'s memory map `base`, read with one
    `pread` per contiguous run: only the bytes the view covers are read (the map is never
    touched), so a process reading its shard of a tensor reads just that share."""
    order, starts, run_bytes = _storage_runs(view, base)
    buf = np.empty(tuple(view.shape[a] for a in order), view.dtype)
    file.read_runs(key, starts, run_bytes, buf.reshape(-1).view(np.uint8))
    return buf.transpose(np.argsort(order))


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
        return nbytes


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


def _zero_view(shape: Sequence[int]) -> np.ndarray:
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
) -> dict[tuple[str, ...], MappedParam]:
    """Maps every source tensor to its slot in our params; appends every problem found.

    `shapes`: our params' `ShapeDtypeStruct` tree (its dtypes are the target dtypes). Checks:
    unexpected keys, keys for params the model lacks, layer indices out of range, wrong shapes,
    two keys for one slot, params/layers/parts no key fills, and (reading only those tensors)
    that dummy ViT heads are exactly zero.
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
            want = _zero_view(slab_shape)[target.part].shape if target.part is not None else slab_shape
            info = file.info(key)
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
                              want[axis] if axis is not None else 0)
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


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{len(problems)} problem(s) converting {what}:\n  " + "\n  ".join(problems))


def _shapes(cfg: NVLMConfig):
    return nn.meta.unbox(nvlm_model.abstract_params(cfg))


def _with_dtype(cfg: NVLMConfig, dtype: str) -> NVLMConfig:
    name = jnp.dtype(dtype).name
    return cfg.replace(dtype=name, param_dtype=name)


def _with_dummy_heads(cfg: NVLMConfig, n: int) -> NVLMConfig:
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
    """

    cfg: NVLMConfig
    params: dict[tuple[str, ...], StreamedParam]
    folders: list[Path]
    total_bytes: int
    total_tensors: int
    progress: Progress | None = None

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
) -> ConversionPlan:
    """Validates an NVLM-D release-layout folder and plans its conversion (reads no weights,
    except the dummy-head slices it verifies). Raises one ValueError listing every problem."""
    folder = Path(hf_dir)
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
    dummy = _infer_dummy_heads(ckpt, src_cfg, "vision_model.")
    if dummy is not None:
        src_cfg = _with_dummy_heads(src_cfg, dummy)
    if not 0 <= src_cfg.image_context_token_id < src_cfg.llm.vocab_size:
        problems.append(
            f"image context token id {src_cfg.image_context_token_id} is outside the vocabulary "
            f"({src_cfg.llm.vocab_size} rows)"
        )
    cfg = _with_dtype(src_cfg, dtype)
    if drop_dummy_heads:
        cfg = _with_dummy_heads(cfg, 0)
    return _finish_plan([Source("nvlm", ckpt, src_cfg)], cfg, problems, [folder], progress, str(folder))


def _finish_plan(sources, cfg, problems, folders, progress, what, extra=None) -> ConversionPlan:
    total_bytes = sum(s.ckpt.total_bytes for s in sources)
    total_tensors = sum(len(s.ckpt.key_to_file) for s in sources)
    bar = Progress(total_tensors, total_bytes, progress, desc="convert")
    params: dict = plan_params(sources, _shapes(cfg), problems, progress=bar.update)
    _raise(problems, what)
    for path, arr in (extra or {}).items():
        params[path] = ArrayParam(path, arr)
    return ConversionPlan(cfg, params, folders, total_bytes, total_tensors, bar)


# ---- Orbax writing and reading ------------------------------------------------------------------


WRITE_PIECE_BYTES = 128 * 1024**2


def _pieces(index: tuple, data: np.ndarray, chunk: Sequence[int]) -> Iterator[tuple[tuple, np.ndarray]]:
    """Splits one slab write into pieces of whole storage chunks (≈ WRITE_PIECE_BYTES each)
    along its first chunked axis, so the writer encodes a few chunks at a time instead of
    holding an encoded copy of the whole slab."""
    full = tuple(index) + (slice(None),) * (data.ndim - len(index))
    axis = next((a for a in range(data.ndim) if chunk[a] < data.shape[a]), None)
    if axis is None or data.nbytes <= WRITE_PIECE_BYTES:
        yield full, data
        return
    row_bytes = data.nbytes // data.shape[axis]
    step = max(1, WRITE_PIECE_BYTES // (row_bytes * chunk[axis])) * chunk[axis]
    start = full[axis].start or 0
    for p0 in range(0, data.shape[axis], step):
        piece = [slice(None)] * data.ndim
        piece[axis] = slice(p0, p0 + step)
        where = list(full)
        where[axis] = slice(start + p0, start + min(p0 + step, data.shape[axis]))
        yield tuple(where), data[tuple(piece)]


def _streamed_handler(budget_bytes: int):
    """An Orbax numpy type handler that writes `StreamedParam`s slab by slab.

    One slab is produced at a time (in the event-loop thread, while TensorStore encodes and
    writes earlier slabs on its own threads); a new slab is started only while the slabs
    being written plus it stay within `budget_bytes` (or nothing is in flight), which bounds
    host memory near the largest slab.
    """
    import tensorstore as ts
    from orbax.checkpoint import type_handlers

    class StreamedParamHandler(type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)
            self._cond: asyncio.Condition | None = None
            self._in_flight = 0

        async def _open_and_write(self, value, tspec, ts_context):
            if self._cond is None:
                self._cond = asyncio.Condition()
            cond = self._cond
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            chunk = tuple(store.chunk_layout.write_chunk.shape)
            if not isinstance(value, StreamedParam):
                value = ArrayParam((), value)
            slabs, nbytes = value.slabs(), value.slab_nbytes
            while True:
                async with cond:
                    await cond.wait_for(lambda: self._in_flight == 0 or self._in_flight + nbytes <= budget_bytes)
                    item = next(slabs, None)
                    if item is None:
                        return
                    self._in_flight += nbytes
                try:
                    for where, piece in _pieces(*item, chunk):
                        # The slab is ours and never modified: TensorStore may keep a reference.
                        await store[where].write(piece, can_reference_source_data_indefinitely=True)
                finally:
                    del item
                    async with cond:
                        self._in_flight -= nbytes
                        cond.notify_all()

    return StreamedParamHandler()


def save_streamed(directory: Path, tree: Mapping) -> None:
    """Writes a tree of `StreamedParam`s (or arrays) as an Orbax PyTree checkpoint, with host
    memory near 1.25 x its largest slab (a layer of a stacked param, or an unstacked param)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    is_leaf = lambda x: isinstance(x, StreamedParam)  # noqa: E731
    largest = max((p.slab_nbytes if is_leaf(p) else np.asarray(p).nbytes)
                  for p in jax.tree_util.tree_leaves(tree, is_leaf=is_leaf))
    handler = _streamed_handler(int(1.25 * largest))
    registry = type_handlers.create_type_handler_registry(
        (StreamedParam, handler), (np.ndarray, handler), (jax.Array, type_handlers.ArrayHandler())
    )

    def save_args(p):
        layered = is_leaf(p) and p.layered
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if layered else ())

    args = jax.tree_util.tree_map(save_args, tree, is_leaf=is_leaf)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(tree, save_args=args))


# ---- sharded writing: each process reads and writes only its shards --------------------------


@dataclasses.dataclass(frozen=True)
class ShardedWrite:
    """What one process did in `save_sharded`.

    Attributes:
      bytes_read: source bytes this process read for its shards (counted at the `pread`s).
      share_bytes: the source bytes of the distinct blocks its devices hold, from the shardings
        alone (each block's share of its param's source bytes): what `bytes_read` should be.
      total_bytes: source bytes of the whole checkpoint.
      blocks: distinct blocks read (replicas on several local devices are read once).
    """

    bytes_read: int
    share_bytes: int
    total_bytes: int
    blocks: int


def _bounds(index: tuple, shape: Sequence[int]) -> Bounds:
    """A shard index (slices, as in `Sharding.addressable_devices_indices_map`) as `Bounds`."""
    out = []
    for axis, size in enumerate(shape):
        start, stop, step = (index[axis] if axis < len(index) else slice(None)).indices(size)
        if step != 1:
            raise ValueError(f"shard index {index} has step {step} on axis {axis}; only contiguous blocks are read")
        out.append((start, stop))
    return tuple(out)


def _local_blocks(shape: Sequence[int], sharding: jax.sharding.Sharding) -> dict[Bounds, list[jax.Device]]:
    """The distinct blocks this process's devices hold, each with the devices holding it."""
    blocks: dict[Bounds, list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        blocks.setdefault(_bounds(index, shape), []).append(device)
    return blocks


def _source_bytes(param: StreamedParam) -> int:
    if isinstance(param, MappedParam):
        return sum(s.nbytes for slots in param.slots.values() for s in slots)
    return 0


def _global_array(param: StreamedParam, sharding: jax.sharding.Sharding, blocks, on_read) -> jax.Array:
    """`param` as a global jax.Array of `sharding`, built from this process's blocks only.

    Like `jax.make_array_from_callback`, but each block goes to its devices before the next is
    read, so host memory holds one block, not the process's whole share of the param.
    """
    arrays = []
    for bounds, devices in blocks.items():
        host, nbytes = param.shard(bounds)
        on_read(nbytes)
        arrays += [jax.device_put(host, d) for d in devices]
        del host
    return jax.make_array_from_single_device_arrays(param.shape, sharding, arrays)


def save_sharded(
    directory: Path,
    plan: ConversionPlan,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    progress: bool = False,
) -> ShardedWrite:
    """Writes `plan`'s params as an Orbax checkpoint laid out on `mesh`; called by every process.

    Each param becomes a global jax.Array whose blocks this process reads straight from the
    source (only the bytes of its own blocks), cast to the target dtype; Orbax then writes each
    shard from the process that holds its first replica, and the primary process writes the
    metadata. Device memory holds this process's share of every param until the write ends.
    """
    import orbax.checkpoint as ocp

    shardings = param_shardings(plan.cfg, mesh, rules)
    local = {path: _local_blocks(p.shape, wm.tree_get(shardings, path)) for path, p in plan.params.items()}
    share = sum(_source_bytes(p) * math.prod(b - a for a, b in bounds) // p.size
                for path, p in plan.params.items() for bounds in local[path])
    bar = Progress(len(plan.params), share, progress and jax.process_index() == 0, desc="convert (sharded)")
    read = 0

    def on_read(nbytes: int) -> None:
        nonlocal read
        read += nbytes

    tree: dict = {}
    try:
        for path, p in plan.params.items():
            before = read
            wm.tree_set(tree, path, _global_array(p, wm.tree_get(shardings, path), local[path], on_read))
            bar.update(read - before)
    finally:
        bar.close()
    args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(tree, save_args=args))
    return ShardedWrite(read, share, plan.total_bytes, sum(len(b) for b in local.values()))


def read_our_config(ckpt_dir: str | os.PathLike) -> NVLMConfig:
    """The `NVLMConfig` stored in one of our checkpoint folders."""
    path = Path(ckpt_dir) / OUR_CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an nvlm_jax checkpoint config (format != {FORMAT!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data['format_version']} is newer than this code ({FORMAT_VERSION})")
    return NVLMConfig.from_dict(data["config"])


def is_our_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / OUR_CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def param_shardings(cfg: NVLMConfig, mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES):
    """Target shardings of our params: by the logical rules on `mesh`, else the first device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda _: device, _shapes(cfg))
    return tree_shardings(nvlm_model.abstract_params(cfg), mesh, rules)


def load_our_params(
    ckpt_dir: str | os.PathLike,
    cfg: NVLMConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
):
    """Restores the params of one of our checkpoints, cast to `cfg.param_dtype` and placed on
    `mesh` (or the first device). Each device reads only its shards. `mesh` need not be the one
    the checkpoint was written with (or any): Orbax reads each target block from the stored
    chunks."""
    import orbax.checkpoint as ocp

    shapes = _shapes(cfg)
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings(cfg, mesh, rules)
    )
    directory = (Path(ckpt_dir) / PARAMS_DIR).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(directory, target)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"{directory}: cannot restore params for this config: {e}") from e


# ---- public conversion entry points ------------------------------------------------------------


class _Staging:
    """A temporary sibling folder that becomes `out_dir` only when the block succeeds."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool):
        self.out = Path(out_dir).absolute()
        _check_out_dir(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _replace_dir(self.tmp, self.out)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Renames the finished `tmp` to `out`, moving an existing `out` aside first."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _copy_tokenizer(folders: Sequence[Path], out: Path) -> list[str]:
    copied = []
    for folder in folders:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and name not in copied:
                shutil.copy2(folder / name, out / name)
                copied.append(name)
    return copied


def _write_our_config(out: Path, cfg: NVLMConfig, source: dict[str, Any]) -> None:
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "source": dict(source, converted_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
    }
    (out / OUR_CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _sync(name: str) -> None:
    """A barrier across every process (a no-op cost with one)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"nvlm_jax.convert:{name}")


def _write_plan_sharded(plan: ConversionPlan, out_dir, overwrite: bool, source: dict[str, Any],
                        mesh: jax.sharding.Mesh, rules: LogicalRules) -> tuple[Path, ShardedWrite]:
    """`_write_plan` on a mesh, run by every process of the job.

    Every process checks the mesh and the destination first (so a bad one fails everywhere
    before anything is written). Process 0 owns the staging folder (a fixed name beside
    `out_dir`, so every process finds it on the shared file system), the config and tokenizer
    files and the final rename; barriers keep the others from writing before it exists and
    from returning before `out_dir` is complete.
    """
    out = Path(out_dir).absolute()
    nvlm_model.check_mesh(plan.cfg, mesh, rules)
    _check_out_dir(out, overwrite)
    primary = jax.process_index() == 0
    tmp = out.parent / f".{out.name}.tmp-sharded"
    if primary:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died
        tmp.mkdir()
    _sync("staging")
    try:
        stats = save_sharded(tmp / PARAMS_DIR, plan, mesh, rules, plan.progress is not None and plan.progress.enabled)
        if primary:
            _write_our_config(tmp, plan.cfg, source)
            _copy_tokenizer(plan.folders, tmp)
            _replace_dir(tmp, out)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("done")
    return out, stats


def _write_plan(plan: ConversionPlan, out_dir, overwrite: bool, source: dict[str, Any],
                mesh: jax.sharding.Mesh | None = None, rules: LogicalRules = DEFAULT_RULES) -> Path:
    if mesh is not None:
        return _write_plan_sharded(plan, out_dir, overwrite, source, mesh, rules)[0]
    with _Staging(out_dir, overwrite) as tmp:
        try:
            save_streamed(tmp / PARAMS_DIR, plan.tree())
        finally:
            if plan.progress is not None:
                plan.progress.close()
        _write_our_config(tmp, plan.cfg, source)
        _copy_tokenizer(plan.folders, tmp)
    return Path(out_dir).absolute()


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    drop_dummy_heads: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Path:
    """Converts an NVLM-D Hugging Face folder into our Orbax checkpoint folder `out_dir`.

    Args:
      hf_dir: folder with `config.json`, safetensors shards (+ index) and tokenizer files.
      out_dir: destination; created atomically (temporary sibling folder, renamed at the end).
      dtype: storage dtype of the converted params (round-to-nearest-even casts).
      drop_dummy_heads: slice the (verified zero) dummy ViT heads away instead of keeping the
        release's padded head layout.
      overwrite: replace an existing `out_dir`.
      progress: draw a tqdm bar (bytes and tensors).
      mesh: None: stream the params through host memory one slab at a time (one process).
        A mesh: `convert_sharded`, called by every process of the job.
      rules: logical-axis rules of the sharded layout.

    Returns:
      `out_dir` as an absolute Path. Raises ValueError listing every problem of the source.
    """
    if mesh is not None:
        return convert_sharded(hf_dir, out_dir, mesh, dtype=dtype, drop_dummy_heads=drop_dummy_heads,
                               overwrite=overwrite, progress=progress, rules=rules)[0]
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress)
    return _write_plan(plan, out_dir, overwrite, _convert_source(hf_dir, dtype, drop_dummy_heads))


def _convert_source(hf_dir, dtype: str, drop_dummy_heads: bool, **extra) -> dict[str, Any]:
    return {"hf_dir": str(Path(hf_dir).absolute()), "layout": "nvlm", "dtype": jnp.dtype(dtype).name,
            "drop_dummy_heads": drop_dummy_heads, **extra}


def convert_sharded(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    *,
    dtype: str = "bfloat16",
    drop_dummy_heads: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    rules: LogicalRules = DEFAULT_RULES,
) -> tuple[Path, ShardedWrite]:
    """`convert` straight into the sharded layout of `mesh`; every process of the job calls it.

    Each process validates the source and the mesh (so all of them raise the same error before
    anything is written), reads only the blocks of each tensor its own devices hold and writes
    its own shards of one Orbax checkpoint; process 0 writes the metadata, config and tokenizer
    files and renames the staging folder into place. `out_dir` must be on a file system every
    process sees. The result restores onto any mesh (`load_our_params`).

    Returns `(out_dir, what this process read)`.
    """
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress)
    source = _convert_source(hf_dir, dtype, drop_dummy_heads, mesh=dict(mesh.shape), processes=jax.process_count())
    return _write_plan_sharded(plan, out_dir, overwrite, source, mesh, rules)


def load_hf_params(
    hf_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    *,
    drop_dummy_heads: bool = False,
    progress: bool = False,
    rules: LogicalRules = DEFAULT_RULES,
) -> tuple[NVLMConfig, dict]:
    """Reads an NVLM-D Hugging Face folder straight into device arrays (no Orbax step).

    Params are assembled one at a time on the host and placed on `mesh` (or the first device),
    so host memory peaks near the largest (stacked) param. Returns `(config, params)`.
    """
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress)
    shardings = param_shardings(plan.cfg, mesh, rules)
    try:
        flat = {path: jax.device_put(p.materialize(), wm.tree_get(shardings, path)) for path, p in plan.params.items()}
    finally:
        if plan.progress is not None:
            plan.progress.close()
    tree: dict = {}
    for path, arr in flat.items():
        wm.tree_set(tree, path, arr)
    return plan.cfg, tree


# ---- export: our params → release-layout safetensors -------------------------------------------


def to_hf_config(cfg: NVLMConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """A release-format (`NVLM_D`) `config.json` dict that `NVLMConfig.from_hf` reads back as `cfg`
    (up to the runtime-only fields: dtypes, attention/remat settings, the dummy-head count,
    which is re-derived from the weights, and the image token id, which comes from the tokenizer)."""
    if cfg.arch != "D":
        raise ValueError(f"only NVLM-D has a released Hugging Face layout; cannot export arch {cfg.arch!r}")
    m, v = cfg.llm, cfg.vision
    if m.family == "qwen2" and not m.qkv_bias:
        raise ValueError("a qwen2-family LLM without q/k/v biases has no Hugging Face Qwen2 equivalent")
    llm = {
        "architectures": ["Qwen2ForCausalLM" if m.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": m.family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "attention_bias": m.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_word_embeddings,
        "max_position_embeddings": m.max_position_embeddings,
        "torch_dtype": torch_dtype,
    }
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "qk_normalization": v.qk_normalization,
        "qkv_bias": v.qkv_bias,
        "hidden_act": "gelu",
        "initializer_factor": v.layer_scale_init,
        "use_flash_attn": False,
        "torch_dtype": torch_dtype,
    }
    return {
        "architectures": ["NVLM_D"],
        "model_type": "NVLM_D",
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "select_layer": v.select_layer,
        "template": cfg.template,
        "force_image_size": v.image_size,
        "dynamic_image_size": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": cfg.max_tiles,
        "use_thumbnail": cfg.use_thumbnail,
        "img_context_token_id": cfg.image_context_token_id,
        "torch_dtype": torch_dtype,
        "llm_config": llm,
        "vision_config": vision,
    }


def _host_slice(param, index) -> np.ndarray:
    return np.asarray(jax.device_get(param[index] if index is not None else param))


def export_hf(
    params: Mapping,
    cfg: NVLMConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    vit_dummy_heads: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes our params as a release-layout NVLM-D folder (sharded safetensors + index +
    `config.json` [+ tokenizer files]) that `convert` (and the release's PyTorch code, for the
    72B head layout) reads back.

    Args:
      params: our params tree (jax or numpy arrays); read one layer slice at a time.
      cfg: their config.
      dtype: stored dtype of every tensor (default: each param's own dtype, so the round trip
        convert → export is bit-exact).
      vit_dummy_heads: zero ViT heads to pad to (the PyTorch release code expects 7 on the
        25-head 72B ViT); default: keep `cfg`'s layout. Dropping heads checks they are zero.
      tokenizer_dir: where to copy tokenizer files from.
      max_shard_bytes: shard size limit (tensors are never split).
    """
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), dict(params))
    out_cfg = cfg if vit_dummy_heads is None else _with_dummy_heads(cfg, vit_dummy_heads)
    out_heads = out_cfg.vision.total_heads
    slots = wm.layout_slots("nvlm", shapes)
    covered = {s.path for s in slots}
    leftover = [
        "/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
        if tuple(str(getattr(k, "key", k)) for k in kp) not in covered
    ]
    if leftover:
        raise ValueError(f"params {leftover} have no place in the NVLM-D release layout")

    def tensor(slot: wm.KeySlot) -> np.ndarray:
        x = _host_slice(wm.tree_get(params, slot.path), slot.layer)
        if slot.rule.part is not None:
            x = x[slot.rule.part]
        axis = wm.head_axis(slot.path, slot.rule.part)
        if axis is not None and x.shape[axis] != out_heads:
            if x.shape[axis] > out_heads and np.any(x[wm.heads_slice(x.ndim, axis, out_heads)] != 0):
                raise ValueError(f"{'/'.join(slot.path)}: heads {out_heads}.. are not zero, cannot drop them")
            x = wm.resize_heads(x, axis, out_heads)
        return np.asarray(slot.rule.transform.inverse(x, out_cfg))

    def hf_shape(slot: wm.KeySlot) -> tuple[int, ...]:
        leaf = wm.tree_get(shapes, slot.path)
        shape = tuple(leaf.shape[1:] if slot.layer is not None else leaf.shape)
        if slot.rule.part is not None:
            shape = _zero_view(shape)[slot.rule.part].shape
        axis = wm.head_axis(slot.path, slot.rule.part)
        if axis is not None:
            shape = shape[:axis] + (out_heads,) + shape[axis + 1 :]
        return tuple(jax.eval_shape(lambda x: slot.rule.transform.inverse(x, out_cfg),
                                    jax.ShapeDtypeStruct(shape, np.float32)).shape)

    specs = [
        TensorSpec(s.key, hf_shape(s), np.dtype(dtype) if dtype else np.dtype(wm.tree_get(shapes, s.path).dtype))
        for s in slots
    ]
    shards: list[list[int]] = [[]]
    size = 0
    for i, spec in enumerate(specs):
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += spec.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = Progress(len(specs), sum(s.nbytes for s in specs), progress, desc="export")
    torch_dtype = jnp.dtype(dtype or cfg.param_dtype).name
    with _Staging(out_dir, overwrite) as tmp:
        try:
            for name, members in zip(names, shards, strict=True):
                with SafetensorsWriter(tmp / name, [specs[i] for i in members], {"format": "pt"}) as w:
                    for i in members:
                        w.write(specs[i].key, tensor(slots[i]))
                        bar.update(specs[i].nbytes)
        finally:
            bar.close()
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {specs[i].key: name for name, members in zip(names, shards, strict=True) for i in members},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(to_hf_config(out_cfg, torch_dtype), indent=2) + "\n",
                                          encoding="utf-8")
        if tokenizer_dir is not None:
            _copy_tokenizer([Path(tokenizer_dir)], tmp)
    return Path(out_dir).absolute()


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """`export_hf` of one of our checkpoint folders (its params, config and tokenizer files)."""
    cfg = read_our_config(ckpt_dir)
    params = load_our_params(ckpt_dir, cfg)
    kwargs.setdefault("tokenizer_dir", ckpt_dir)
    return export_hf(params, cfg, out_dir, **kwargs)


# ---- assembly: standalone InternViT + standalone LLM → NVLM -------------------------------------


def _standalone(folder: Path, want: str) -> tuple[dict, SafetensorsCheckpoint, list[str]]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    refuse_pickles(folder)
    hf_cfg = read_json(folder / HF_CONFIG_FILE)
    layout = detect_layout(hf_cfg, str(folder / HF_CONFIG_FILE))
    if layout != want:
        raise ValueError(f"{folder}: expected a standalone {want} checkpoint, {HF_CONFIG_FILE} describes {layout}")
    ckpt, problems = open_safetensors(folder)
    return hf_cfg, ckpt, problems


def assembled_config(
    vit_config: Mapping[str, Any],
    llm_config: Mapping[str, Any],
    *,
    arch: str = "D",
    vit_dummy_heads: int = 0,
    image_context_token_id: int,
    xattn_every: int | None = None,
    downsample_ratio: float = 0.5,
) -> NVLMConfig:
    """Our config for a new NVLM model from an InternViT and an LLM `config.json` (read through
    the same code as the release config, so field meanings cannot drift)."""
    synthetic = {
        "model_type": "NVLM_D",
        "vision_config": dict(vit_config),
        "llm_config": dict(llm_config),
        "downsample_ratio": downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "chatml",
    }
    base = NVLMConfig.from_hf(synthetic, arch="D", image_context_token_id=image_context_token_id)
    vision: VisionConfig = dataclasses.replace(base.vision, num_dummy_heads=vit_dummy_heads)
    projector = ProjectorConfig(
        input_size=base.projector.input_size,
        hidden_size=base.llm.intermediate_size,
        output_size=base.llm.hidden_size,
        num_layers=1 if arch == "X" else 2,
    )
    if arch in ("X", "H") and xattn_every is None:
        xattn_every = max(1, base.llm.num_layers // 10)  # the paper's 10 cross-attention blocks
    return base.replace(arch=arch, vision=vision, projector=projector,
                        xattn_every=xattn_every if arch in ("X", "H") else None)


def fresh_params(cfg: NVLMConfig, names: Sequence[str], seed: int) -> dict[str, Any]:
    """Freshly initialised top-level param groups `names` (projector; X/H: the cross-attention
    blocks) by the model's own initialisers, without initialising the ViT or the LLM: `init`
    runs only the projector, so of the submodules only it and the params `setup` declares
    directly are created."""
    feats = jnp.zeros((1, 1, cfg.projector.input_size), jnp.float32)

    def init(key, x):
        return nvlm_model.NVLM(cfg).init(key, x, method=lambda m, f: m.projector(f))["params"]

    params = nn.meta.unbox(jax.jit(init)(jax.random.key(seed), feats))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"cannot initialise the {missing} params of arch {cfg.arch!r} on their own")
    return {n: jax.tree_util.tree_map(np.asarray, params[n]) for n in names}


def assemble(
    vit_dir: str | os.PathLike,
    llm_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "D",
    dtype: str = "bfloat16",
    seed: int = 0,
    vit_dummy_heads: int = 0,
    image_context_token_id: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Path:
    """Builds a fresh NVLM checkpoint from a standalone InternViT (OpenGVLab safetensors layout:
    `embeddings.*`, `encoder.layers.*`) and a standalone Qwen2/Llama causal LM (HF layout); every
    other param (the projector) is freshly initialised from `seed`. Tokenizer files come from
    the LLM folder, whose `<|vision_pad|>` becomes the image context token unless
    `image_context_token_id` is given. `vit_dummy_heads` pads the ViT with zero heads (7 turns
    25 heads into the release's 32). `mesh`: write the sharded layout of that mesh, as in
    `convert_sharded` (every process calls this)."""
    vit_folder, llm_folder = Path(vit_dir), Path(llm_dir)
    vit_hf, vit_ckpt, problems = _standalone(vit_folder, "internvit")
    llm_hf, llm_ckpt, llm_problems = _standalone(llm_folder, "llm")
    problems += llm_problems
    if image_context_token_id is None:
        special = tokenizer_special_ids(llm_folder)
        if special is None:
            raise ValueError(
                f"{llm_folder}: no tokenizer files to read <|vision_pad|> from; pass image_context_token_id"
            )
        image_context_token_id = special.vision_pad
    cfg = assembled_config(vit_hf, llm_hf, arch=arch, vit_dummy_heads=vit_dummy_heads,
                           image_context_token_id=image_context_token_id)
    vit_src = _with_dummy_heads(cfg, _infer_dummy_heads(vit_ckpt, cfg, "") or 0)
    target = _with_dtype(cfg, dtype)
    shapes = _shapes(target)
    sources = [Source("internvit", vit_ckpt, vit_src, ("vision",)), Source("llm", llm_ckpt, cfg, ("llm",))]
    fresh_names = [k for k in shapes if k not in ("vision", "llm")]
    fresh = fresh_params(target, fresh_names, seed)
    extra = {}
    for name, group in fresh.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(group)[0]:
            extra[(name,) + tuple(str(getattr(k, "key", k)) for k in kp)] = np.asarray(leaf)
    plan = _finish_plan(sources, target, problems, [llm_folder], progress, f"{vit_folder} + {llm_folder}", extra)
    source = {"vit_dir": str(vit_folder.absolute()), "llm_dir": str(llm_folder.absolute()), "arch": arch,
              "dtype": jnp.dtype(dtype).name, "fresh": fresh_names, "seed": seed}
    return _write_plan(plan, out_dir, overwrite, source, mesh, rules)


# ---- CLI ------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module adds none)."""
    flags.DEFINE_string("hf_dir", None, "NVLM-D Hugging Face folder to convert into --out_dir.")
    flags.DEFINE_string("export_from", None, "Our Orbax checkpoint folder to export (Hugging Face layout) "
                        "into --out_dir.")
    flags.DEFINE_string("vit_dir", None, "Standalone InternViT folder to assemble (with --llm_dir).")
    flags.DEFINE_string("llm_dir", None, "Standalone Qwen2/Llama folder to assemble (with --vit_dir).")
    flags.DEFINE_string("out_dir", None, "Destination folder (written atomically).")
    flags.DEFINE_string("dtype", "bfloat16", "Stored dtype of converted params (import/assembly); export: "
                        "stored dtype of the safetensors (default: the params' own).")
    flags.DEFINE_bool("drop_dummy_heads", False, "Import: slice the (verified zero) dummy ViT heads away.")
    flags.DEFINE_integer("vit_dummy_heads", None, "Assembly: zero heads to pad the ViT with (default 0); "
                         "export: dummy heads to store (default: as in the params).")
    flags.DEFINE_enum("arch", "D", ["D", "X", "H"], "Assembly: the NVLM architecture to build.")
    flags.DEFINE_integer("seed", 0, "Assembly: seed of the freshly initialised params.")
    flags.DEFINE_integer("image_context_token_id", None, "Assembly: image context token id "
                         "(default: the LLM tokenizer's <|vision_pad|>).")
    flags.DEFINE_string("max_shard_size", "5GB", "Export: largest shard, e.g. 5GB or 500MB.")
    flags.DEFINE_bool("overwrite", False, "Replace --out_dir if it exists.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("mesh", None, "Import/assembly: write straight into the sharded layout of a "
                        "data,fsdp,tensor mesh over every device of every process (e.g. 1,2,4; one size may be "
                        "-1); each process reads and writes only its own shards. Run the same command in every "
                        "process, with the distributed flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID.")
    distributed.define_flags()


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'1,2,4' → (data, fsdp, tensor) = (1, 2, 4); one size may be -1 (the remaining devices)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(n == 0 or n < -1 for n in sizes):
        raise ValueError(f"--mesh must be three sizes data,fsdp,tensor (positive, or one -1), got {text!r}")
    return sizes


def parse_size(text: str) -> int:
    """'5GB' → 5e9, '500MiB' → 500·2^20, '1234' → 1234 bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 5GB, 500MiB or a byte count)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    modes = [bool(FLAGS.hf_dir), bool(FLAGS.export_from), bool(FLAGS.vit_dir or FLAGS.llm_dir)]
    if sum(modes) != 1 or not FLAGS.out_dir:
        raise app.UsageError("give --out_dir and exactly one of: --hf_dir, --export_from, --vit_dir + --llm_dir")
    if FLAGS.mesh and FLAGS.export_from:
        raise app.UsageError("--mesh applies to --hf_dir and --vit_dir/--llm_dir, not to --export_from")
    try:
        sizes = parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    # Before anything touches a JAX backend.
    if distributed.initialize(distributed.from_flags()) and sizes is None:
        raise app.UsageError("a multi-process run needs --mesh: without it every process would write the "
                             "whole checkpoint")
    mesh = make_mesh(*sizes) if sizes is not None else None
    if FLAGS.hf_dir and mesh is not None:
        out, stats = convert_sharded(FLAGS.hf_dir, FLAGS.out_dir, mesh, dtype=FLAGS.dtype,
                                     drop_dummy_heads=FLAGS.drop_dummy_heads, overwrite=FLAGS.overwrite,
                                     progress=FLAGS.progress)
        print(f"process {jax.process_index()} of {jax.process_count()}: read {stats.bytes_read} source bytes "
              f"(its share {stats.share_bytes}, whole checkpoint {stats.total_bytes}) in {stats.blocks} blocks; "
              f"peak RSS {_peak_rss_bytes()} bytes", flush=True)
    elif FLAGS.hf_dir:
        out = convert(FLAGS.hf_dir, FLAGS.out_dir, dtype=FLAGS.dtype, drop_dummy_heads=FLAGS.drop_dummy_heads,
                      overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    elif FLAGS.export_from:
        dtype = FLAGS.dtype if FLAGS["dtype"].present else None
        out = export_checkpoint(FLAGS.export_from, FLAGS.out_dir, dtype=dtype, vit_dummy_heads=FLAGS.vit_dummy_heads,
                                max_shard_bytes=parse_size(FLAGS.max_shard_size), overwrite=FLAGS.overwrite,
                                progress=FLAGS.progress)
    else:
        if not (FLAGS.vit_dir and FLAGS.llm_dir):
            raise app.UsageError("assembly needs both --vit_dir and --llm_dir")
        out = assemble(FLAGS.vit_dir, FLAGS.llm_dir, FLAGS.out_dir, arch=FLAGS.arch, dtype=FLAGS.dtype,
                       seed=FLAGS.seed, vit_dummy_heads=FLAGS.vit_dummy_heads or 0,
                       image_context_token_id=FLAGS.image_context_token_id, overwrite=FLAGS.overwrite,
                       progress=FLAGS.progress, mesh=mesh)
    print(f"wrote {out}")


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux `VmHWM`), or None where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    define_flags()
    app.run(main)
