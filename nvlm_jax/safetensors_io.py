"""A small, strict safetensors reader and streaming writer (NumPy only, no pickle, no torch).

File format: 8 bytes little-endian u64 `N`, then `N` bytes of JSON
`{key: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data; offsets are relative to the end of the header.

Why our own: `safetensors`' NumPy `get_slice` fails on bf16, and a converter needs to
(a) validate every shard (truncated files, bad offsets, unknown dtypes) before reading data and
(b) read one tensor at a time with host memory near that tensor. `SafetensorsFile.tensor` maps
only that tensor's bytes (`np.memmap`); the mapping is released when the returned array is
dropped. bf16 and fp8 come from `ml_dtypes`.

The writer streams: `SafetensorsWriter` takes every tensor's key/shape/dtype up front (so the
header can be written first) and then the data one tensor at a time, in any order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype tag → NumPy dtype (little-endian, as stored).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAGS = {v: k for k, v in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


def dtype_tag(dtype) -> str:
    """The safetensors tag of a NumPy dtype (e.g. bfloat16 → "BF16")."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for known, tag in _TAGS.items():
        if known == dt:
            return tag
    raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file: `begin`/`end` are absolute byte offsets."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One safetensors file, header parsed and validated at construction.

    Raises ValueError naming the file for: a file shorter than its header or data (truncated),
    a malformed header, an unknown dtype, a size that does not match shape x dtype, or tensors
    that overlap or run outside the data region.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        problems = []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    # The length is the file's first 8 bytes: never print it (that would echo them).
                    raise ValueError(f"{self.path}: declares a header over {MAX_HEADER_BYTES} bytes: not a safetensors "
                                     "file, or a corrupt one")
                if 8 + n > size:
                    raise ValueError(f"{self.path}: truncated or not a safetensors file: its header runs past the end "
                                     f"of the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read safetensors file: {e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            offset = 8 + e.start
            raise ValueError(f"{self.path}: safetensors header is not UTF-8 (bad byte at offset {offset})") from None
        except json.JSONDecodeError as e:
            # e.msg and the position only: the exception's text may quote the file's bytes.
            where = f"{e.msg} at offset {8 + e.pos}"
            raise ValueError(f"{self.path}: safetensors header is not valid JSON ({where})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: safetensors header is not a JSON object")
        self.data_start = 8 + n
        self.file_size = size
        meta = header.pop(METADATA_KEY, None) or {}
        if not isinstance(meta, dict):
            problems.append(f"{METADATA_KEY} is not an object")
        else:
            self.metadata = {str(k): str(v) for k, v in meta.items()}
        data_end = 0
        for key, entry in header.items():
            info = self._parse_entry(key, entry, problems)
            if info is not None:
                self.tensors[key] = info
                data_end = max(data_end, info.end)
        spans = sorted((t.begin, t.end, t.key) for t in self.tensors.values() if t.nbytes)
        for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:], strict=False):
            if begin_b < end_a:
                problems.append(f"tensors {key_a!r} and {key_b!r} overlap")
        if data_end > size:
            problems.append(
                f"truncated safetensors file: data runs to byte {data_end}, file has {size} bytes"
            )
        if problems:
            raise ValueError(f"{self.path}: " + "; ".join(problems))

    def _parse_entry(self, key: str, entry, problems: list[str]) -> TensorInfo | None:
        if not isinstance(entry, dict):
            problems.append(f"entry {key!r} is not an object")
            return None
        tag, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if tag not in DTYPES:
            problems.append(f"tensor {key!r} has unsupported dtype {tag!r}")
            return None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            problems.append(f"tensor {key!r} has invalid shape {shape!r}")
            return None
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            problems.append(f"tensor {key!r} has invalid data_offsets {offsets!r}")
            return None
        dtype = DTYPES[tag]
        want = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != want:
            problems.append(
                f"tensor {key!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                f"shape {tuple(shape)} x {tag} needs {want}"
            )
            return None
        return TensorInfo(key, dtype, tuple(shape), self.data_start + offsets[0], self.data_start + offsets[1])

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor {key!r}") from None

    def tensor(self, key: str) -> np.ndarray:
        """The tensor as a read-only array mapped from the file (zero-copy, lazily paged in).

        Its pages are unmapped once the returned array (and every view of it) is dropped.
        """
        info = self.info(key)
        if info.nbytes == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(self.path, dtype=info.dtype, mode="r", offset=info.begin, shape=info.shape)

    def read(self, key: str) -> np.ndarray:
        """The tensor copied into a fresh in-memory array (plain `read` calls, no mapping)."""
        info = self.info(key)
        out = np.empty(info.shape, info.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise ValueError(f"{self.path}: tensor {key!r} truncated: read {got} of {info.nbytes} bytes")
        return out

    def read_range(self, key: str, start: int, out: memoryview | np.ndarray) -> None:
        """Fills `out` with bytes `start : start + len(out)` of tensor `key`'s data (`pread`, no
        mapping: the bytes count against host memory only while the caller holds `out`)."""
        self.read_runs(key, [start], len(memoryview(out).cast("B")), out)

    def read_runs(self, key: str, starts, run_bytes: int, out: memoryview | np.ndarray) -> None:
        """Fills `out` with the byte runs `[s, s + run_bytes)` of tensor `key`'s data, one run
        after another, for each `s` in `starts` (one `pread` per run, one open file): a strided
        slice of a tensor is read without touching the bytes between its runs."""
        info = self.info(key)
        view = memoryview(out).cast("B")
        starts = np.asarray(starts, np.int64).reshape(-1)
        if len(view) != len(starts) * run_bytes:
            raise ValueError(f"{self.path}: tensor {key!r}: {len(starts)} runs of {run_bytes} bytes do not fill "
                             f"a {len(view)}-byte buffer")
        if len(starts) and (starts.min() < 0 or starts.max() + run_bytes > info.nbytes):
            lo, hi = int(starts.min()), int(starts.max()) + run_bytes
            raise ValueError(f"{self.path}: bytes {lo}..{hi} outside tensor {key!r} ({info.nbytes})")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, start in enumerate(starts.tolist()):
                run = view[i * run_bytes : (i + 1) * run_bytes]
                done = 0
                while done < run_bytes:
                    n = os.preadv(fd, [run[done:]], info.begin + start + done)
                    if n <= 0:
                        raise ValueError(f"{self.path}: tensor {key!r} truncated at byte {start + done}")
                    done += n
        finally:
            os.close(fd)


# ---- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front and streamed in.

    Usage: `with SafetensorsWriter(path, specs) as w: w.write(key, array) ...`. Arrays are cast
    to the declared dtype (round-to-nearest-even for float narrowing). Leaving the block without
    an exception checks every declared tensor was written; the file appears at `path` only then
    (written as `path.tmp` and renamed).
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        # Declared dtypes are normalised to the stored little-endian dtype of their tag.
        self.specs = {
            s.key: TensorSpec(s.key, tuple(int(d) for d in s.shape), DTYPES[dtype_tag(s.dtype)]) for s in specs
        }
        header: dict = {}
        if metadata:
            header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._offsets: dict[str, int] = {}
        for key, spec in self.specs.items():
            header[key] = {"dtype": dtype_tag(spec.dtype), "shape": list(spec.shape),
                           "data_offsets": [offset, offset + spec.nbytes]}
            self._offsets[key] = offset
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, like the reference writer
        self._data_start = 8 + len(raw)
        self._total = self._data_start + offset
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._f.truncate(self._total)
        self._written: set[str] = set()

    def write(self, key: str, array: np.ndarray) -> None:
        spec = self.specs.get(key)
        if spec is None:
            raise ValueError(f"{self.path}: tensor {key!r} was not declared")
        if key in self._written:
            raise ValueError(f"{self.path}: tensor {key!r} written twice")
        array = np.asarray(array)
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"{self.path}: tensor {key!r} has shape {array.shape}, declared {spec.shape}")
        data = np.ascontiguousarray(array, dtype=spec.dtype)
        self._f.seek(self._data_start + self._offsets[key])
        self._f.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._written.add(key)

    def close(self, ok: bool = True) -> None:
        if self._f.closed:
            return
        self._f.close()
        missing = sorted(set(self.specs) - self._written)
        if not ok or missing:
            self._tmp.unlink(missing_ok=True)
            if ok:
                raise ValueError(f"{self.path}: tensors declared but not written: {missing}")
            return
        os.replace(self._tmp, self.path)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Writes a dict of arrays to one safetensors file (keys in the given order)."""
    specs = [TensorSpec(k, tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one file, copied into memory (for tests and small files)."""
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.keys()}
