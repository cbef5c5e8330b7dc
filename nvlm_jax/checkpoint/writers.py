"""Writing converted folders: the Orbax writers (streamed: one slab of host memory at a time;
sharded: each process writes only the shards its devices hold) and the folder around them
(staged under a temporary name and renamed when complete; `nvlm_config.json` with the model
config and prompt format; tokenizer files copied).

A converted folder:

    out_dir/params/            Orbax (PyTree) checkpoint of the params, our layout
    out_dir/nvlm_config.json   {"format": "nvlm_jax.orbax", "config": NVLMConfig.to_dict(),
                                "prompt_format": PromptFormat.to_dict(), "source": {...}}
    out_dir/<tokenizer files>  copied verbatim
    out_dir/nvlm_manifest.json size + sha256 of every other file, written last (`manifest.py`)

A staging folder (`.<out_dir name>.tmp-*`) holds a marker with its writer's pid and host until
the rename; the next conversion into the same parent removes those of dead runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nvlm_jax import weight_map as wm
from nvlm_jax.checkpoint.copying import Bounds
from nvlm_jax.checkpoint.folders import FORMAT, FORMAT_VERSION, OUR_CONFIG_FILE, PARAMS_DIR, TOKENIZER_FILES
from nvlm_jax.checkpoint.manifest import write_manifest
from nvlm_jax.checkpoint.paths import local_path
from nvlm_jax.checkpoint.plan import ArrayParam, ConversionPlan, MappedParam, StreamedParam
from nvlm_jax.checkpoint.progress import Progress
from nvlm_jax.checkpoint.restore import param_shardings
from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules

log = logging.getLogger(__name__)

# Orbax chunk size target: a stacked param is chunked per layer, then split to ≤ this size.
CHUNK_BYTES = 64 * 1024**2
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

    A slab that raises (e.g. `NonFiniteError`) is kept in `.error` and every write stops
    producing slabs, so the save ends cleanly (no TensorStore write outlives it) and the
    caller raises the error and removes the folder.
    """
    import tensorstore as ts
    from orbax.checkpoint import type_handlers

    class StreamedParamHandler(type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)
            self._cond: asyncio.Condition | None = None
            self._in_flight = 0
            self.error: Exception | None = None

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
                    if self.error is not None:
                        return
                    try:
                        item = next(slabs, None)
                    except Exception as e:  # noqa: BLE001 - raised by save_streamed once the save has ended
                        self.error = e
                        return
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
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
            ckptr.save(directory, args=ocp.args.PyTreeSave(tree, save_args=args))
    except Exception:
        if handler.error is None:
            raise
    if handler.error is not None:  # Orbax's own complaint (params missing) is a consequence of it
        raise handler.error


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


# ---- public conversion entry points ------------------------------------------------------------


STAGING_MARKER = ".nvlm_staging.json"
STALE_UNMARKED_SECONDS = 3600
_STAGING_NAME = re.compile(r"\..+\.tmp-.+")  # .<out_dir name>.tmp-<random or "sharded">


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mark_staging(tmp: Path) -> None:
    """Gives a staging folder the usual folder mode (0o777 & ~umask, as `mkdir` would; mkdtemp
    makes 0o700) and a marker naming its writer (pid, host), so a later run can tell a folder
    a dead run left behind (`remove_stale_staging`) from one a live run is writing."""
    os.chmod(tmp, 0o777 & ~_umask())
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
    (tmp / STAGING_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _is_stale(folder: Path) -> bool:
    try:
        marker = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
        pid, host = int(marker["pid"]), str(marker["host"])
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > STALE_UNMARKED_SECONDS
        except OSError:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable marker (being written?): leave it
    return host == socket.gethostname() and not _pid_alive(pid)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Removes the staging folders (`.<name>.tmp-*`) in `parent` that dead runs left behind: a
    marker whose pid is not alive on this host, or no marker and older than an hour. Logs a
    warning naming each; returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (_STAGING_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        if _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.warning("removed %s, the staging folder of a conversion that died", entry)
    return removed


class Staging:
    """A temporary sibling folder that becomes `out_dir` only when the block succeeds (stale
    staging folders of dead runs in the same parent are removed first)."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool):
        self.out = local_path(out_dir, "the output folder").absolute()
        check_out_dir(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        mark_staging(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        (self.tmp / STAGING_MARKER).unlink(missing_ok=True)
        replace_dir(self.tmp, self.out)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """ValueError when `out` exists (without `overwrite`) or cannot be a folder (an ancestor is
    a regular file)."""
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{out}: cannot create the output folder, {ancestor} is a file, not a folder")
            break
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")


def replace_dir(tmp: Path, out: Path) -> None:
    """Renames the finished `tmp` to `out`, moving an existing `out` aside first."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def copy_tokenizer(folders: Sequence[Path], out: Path) -> list[str]:
    copied = []
    for folder in folders:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and name not in copied:
                shutil.copy2(folder / name, out / name)
                copied.append(name)
    return copied


def write_our_config(out: Path, cfg: NVLMConfig, source: dict[str, Any],
                     prompt_format: PromptFormat | None = None) -> None:
    """Writes `nvlm_config.json`: the model config, the prompt format (default: the model's,
    `PromptFormat.for_model(cfg)`) and where the folder came from."""
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "prompt_format": (prompt_format or PromptFormat.for_model(cfg)).to_dict(),
        "source": dict(source, converted_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
    }
    (out / OUR_CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _sync(name: str) -> None:
    """A barrier across every process (a no-op cost with one)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"nvlm_jax.convert:{name}")


def write_plan_sharded(plan: ConversionPlan, out_dir, overwrite: bool, source: dict[str, Any],
                        mesh: jax.sharding.Mesh, rules: LogicalRules) -> tuple[Path, ShardedWrite]:
    """`write_plan` on a mesh, run by every process of the job.

    Every process checks the mesh and the destination first (so a bad one fails everywhere
    before anything is written). Process 0 owns the staging folder (a fixed name beside
    `out_dir`, so every process finds it on the shared file system), the config and tokenizer
    files and the final rename; barriers keep the others from writing before it exists and
    from returning before `out_dir` is complete.
    """
    out = local_path(out_dir, "the output folder").absolute()
    nvlm_model.check_mesh(plan.cfg, mesh, rules)
    check_out_dir(out, overwrite)
    primary = jax.process_index() == 0
    tmp = out.parent / f".{out.name}.tmp-sharded"
    if primary:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier run into the same out_dir
        tmp.mkdir()
        mark_staging(tmp)
    _sync("staging")
    try:
        stats = save_sharded(tmp / PARAMS_DIR, plan, mesh, rules, plan.progress is not None and plan.progress.enabled)
        _sync("written")  # every process's shards are complete before they are hashed
        if primary:
            write_our_config(tmp, plan.cfg, source, plan.prompt_format)
            copy_tokenizer(plan.folders, tmp)
            (tmp / STAGING_MARKER).unlink(missing_ok=True)
            write_manifest(tmp)
            replace_dir(tmp, out)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("done")
    return out, stats


def write_plan(plan: ConversionPlan, out_dir, overwrite: bool, source: dict[str, Any],
                mesh: jax.sharding.Mesh | None = None, rules: LogicalRules = DEFAULT_RULES) -> Path:
    if mesh is not None:
        return write_plan_sharded(plan, out_dir, overwrite, source, mesh, rules)[0]
    with Staging(out_dir, overwrite) as tmp:
        try:
            save_streamed(tmp / PARAMS_DIR, plan.tree())
        finally:
            if plan.progress is not None:
                plan.progress.close()
        write_our_config(tmp, plan.cfg, source, plan.prompt_format)
        copy_tokenizer(plan.folders, tmp)
        (tmp / STAGING_MARKER).unlink(missing_ok=True)
        write_manifest(tmp)  # last: a folder with a manifest was written completely
    return local_path(out_dir).absolute()


