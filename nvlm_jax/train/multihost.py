"""What the training path needs to run the same program on several processes (hosts).

Every process runs the whole loop: it feeds its own rows of the global batch, calls every
jitted step, evaluation and checkpoint save/restore, and reads back the same (replicated)
metrics, so all processes take the same decisions (stop, save, evaluate) at the same steps.
Only process 0 writes logs. The helpers here are no-ops (or plain NumPy) with one process.

Row layout: `jax.make_array_from_process_local_data` places a process's local rows on the global
rows its devices hold, in ascending order, whatever the device order of the mesh (contiguous
blocks on CPU and GPU, possibly interleaved on TPU). `check_row_layout` makes sure those are a
disjoint, equal share per process: the batch axes (data x fsdp) must be split across processes,
not replicated over them.

Keeping processes in step: CPU collectives (gloo) give up when the other processes have not
joined within 30 s, and a process may well compile a big program that much longer than another.
`synced_call` therefore compiles a program first and waits at a barrier of the coordination
service (whose timeout is ours to choose) before the first run, and `barrier` does the same for
any other point where processes may drift apart.

Data shards: the global batch is read as `num_shards` record-wise shards of the training data;
process p reads shards `[p * k, (p + 1) * k)` with k = num_shards / process_count and feeds
their rows (in shard order). With `num_shards` fixed, the batches do not depend on the number
of processes, so a run may resume on any process count that divides `num_shards`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

BARRIER_TIMEOUT_S = 1800  # a process may be compiling a large program meanwhile
_compiled: set = set()  # signatures `synced_call` has compiled and synced on
_barriers = [0]  # barriers passed so far: names must be unique over the job


def is_primary() -> bool:
    """Whether this process writes logs, metrics and console output (process 0)."""
    return jax.process_index() == 0


def process_shards(num_shards: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The data shards process `process_index` (default: this one) reads, out of `num_shards`
    (0 = one shard per process)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    num_shards = num_shards or count
    if num_shards < 1 or num_shards % count:
        raise ValueError(f"data.num_shards {num_shards} must be a positive multiple of the process count {count} "
                         f"(each process reads the same number of shards)")
    per = num_shards // count
    return range(index * per, (index + 1) * per)


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> dict[int, np.ndarray]:
    """`{process: global row indices}` of a `[num_rows, ...]` array with `sharding` on dim 0:
    the rows each process's devices hold, ascending, which is the order in which
    `jax.make_array_from_process_local_data` lays out that process's local rows."""
    owned: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((num_rows,)).items():
        owned.setdefault(device.process_index, set()).update(range(num_rows)[index[0]])
    return {p: np.array(sorted(rows), np.int64) for p, rows in sorted(owned.items())}


def check_row_layout(sharding: jax.sharding.Sharding, local_rows: int) -> int:
    """The global batch size when every process feeds `local_rows` rows, after checking that
    `sharding` gives each process a disjoint share of exactly `local_rows` rows (so the
    per-process data shards make up the global batch with no row fed twice or missing)."""
    count = jax.process_count()
    total = local_rows * count
    if count == 1:
        return total
    rows = process_rows(sharding, total)
    problems = []
    if sorted(rows) != list(range(count)):
        problems.append(f"the mesh holds devices of processes {sorted(rows)} only; every one of the {count} "
                        "processes feeds rows, so the mesh must use devices of all of them (mesh.num_devices=0)")
    uneven = {p: len(r) for p, r in rows.items() if len(r) != local_rows}
    if uneven:
        problems.append(f"process(es) {uneven} hold a number of rows other than the {local_rows} each feeds: the "
                        "batch axes (data x fsdp) must be split across processes, not replicated over them")
    if not problems and len(set().union(*map(set, rows.values()))) != total:
        problems.append("processes hold overlapping rows")
    if problems:
        raise ValueError(f"global batch of {count} processes x {local_rows} rows: " + "; ".join(problems))
    return total


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree of arrays on every process, whether or not this process holds all
    their shards (a step's replicated metrics, or decoded tokens sharded over the batch)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of a same-shape host array over all processes (a collective: every
    process must call it at the same point)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def from_primary(value: float) -> float:
    """Process 0's `value` on every process (e.g. a timing-based measurement that would
    otherwise differ slightly between processes). A collective, like `sum_over_processes`."""
    if jax.process_count() == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float32(value)))  # f32: JAX runs without x64


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process has reached a barrier called `name` (the same sequence of
    names on every process), using the coordination service, not a device collective."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    _barriers[0] += 1
    ocp.multihost.get_barrier_sync_fn()(key=f"nvlm_jax:{_barriers[0]}:{name}", timeout_ms=timeout_s * 1000)


def _signature(args: Any) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), str(getattr(x, "sharding", "")))
                       for x in leaves)


def synced_call(jitted: Callable, *args: Any, **static: Any) -> Any:
    """`jitted(*args, **static)` (a `jax.jit` function; `static` its static arguments). With
    several processes, the first call per argument signature compiles the program ahead of
    running it and waits at a `barrier` until all processes have, so that none waits for
    another's compilation inside a collective. Every process must make the same calls."""
    if jax.process_count() > 1:
        key = (jitted, tuple(sorted(static.items())), _signature(args))
        if key not in _compiled:
            jitted.lower(*args, **static).compile()  # cached: the call below does not compile again
            barrier(f"compiled {getattr(jitted, '__name__', 'program')}")
            _compiled.add(key)
    return jitted(*args, **static)
