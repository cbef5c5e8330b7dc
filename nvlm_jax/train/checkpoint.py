"""Training checkpoints (Orbax `CheckpointManager`). Reading them outside a run (finding the
latest / best step, the saved run config, restoring the params onto a mesh) is
`nvlm_jax.checkpoint` (`folders.locate`, `restore.load_params`); `restore_params` is re-exported
from there.

A training checkpoint `<workdir>/checkpoints/<step>/` holds three items:
  - ``state``: the `TrainState` (params, optimizer state, counters), saved sharded; a LoRA
    run's params here are its trainable ones only, its frozen base re-created from the init
    source recorded in ``config`` (`nvlm_jax.checkpoint.frozen_base`);
  - ``data``: the data iterators' states, one JSON file per data shard
    (``shard_<i>-of-<n>.json``; Grain dict states as they are, byte states base64-encoded),
    captured when `save` is called, so a resumed run sees exactly the batches the interrupted
    one would have seen next. In a multi-process run each process writes the files of the
    shards it reads (by default one shard per process) and reads back its own on restore; a
    run restores them when its shard count is the saved one (see `nvlm_jax.train.multihost`);
  - ``config``: the run's config (JSON): the model config under "model", the tokenizer spec,
    the prompt format under "prompt_format"; what `nvlm_jax.load_pretrained` reads.

The keep-best metric of a save is also written into Orbax's `_CHECKPOINT_METADATA`
(`custom_metadata.metrics`), so `locate(workdir, step="best")` finds the best step later.

Saves are asynchronous (the step loop continues while arrays are written) and atomic: Orbax
writes into a temporary folder and renames it to `<step>` only when every item is complete, so
a process killed mid-save leaves at most a temporary folder, which the next run deletes; the
latest *complete* step is what `latest_step` and `restore` see. Retention keeps the last
`keep` steps plus the `keep_best` best by a metric (e.g. held-out exact match).

Multi-process runs: every process calls `save` and `restore` (Orbax coordinates them: each
process writes the array shards it holds, process 0 the metadata and the commit), and the
checkpoint folder must be one path that all processes see (a shared filesystem or a bucket).

Restoring takes a target tree of `jax.ShapeDtypeStruct`s with shardings, so a checkpoint saved
on one mesh restores onto any other mesh shape (each device reads only its shards).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nvlm_jax.checkpoint.paths import orbax_dir
from nvlm_jax.checkpoint.restore import restore_params
from nvlm_jax.train.step import TrainState

__all__ = ["CheckpointConfig", "DataShards", "Restored", "TrainCheckpoints", "restore_params"]

DATA_SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Attributes:
      every: save every this many steps (and at the end of the run).
      keep: keep the latest `keep` checkpoints.
      keep_best: also keep the `keep_best` best by `best_metric` (0 = off).
      best_metric: metric name passed with saves (e.g. "eval/exact_match").
      best_mode: "max" or "min".
      async_save: write in the background (`save` returns once arrays are copied off-device).
    """

    every: int = 100
    keep: int = 3
    keep_best: int = 1
    best_metric: str = "eval/exact_match"
    best_mode: str = "max"
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1 or self.keep_best < 0:
            raise ValueError(f"checkpoint every/keep must be >= 1 and keep_best >= 0, got {self}")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint best_mode must be 'max' or 'min', got {self.best_mode!r}")


def encode_iterator_state(state: Any) -> dict[str, Any]:
    """A JSON-able snapshot of a data iterator state (dict/list/number state, bytes, or None)."""
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": base64.b64encode(state).decode()}
    try:
        # The round trip takes a deep copy now (the iterator may mutate its state later).
        return {"kind": "json", "value": json.loads(json.dumps(state, default=_json_default))}
    except TypeError as e:
        raise ValueError(f"data iterator state of type {type(state).__name__} is not JSON-serializable: {e}") from e


def decode_iterator_state(blob: Mapping[str, Any]) -> Any:
    """Inverse of `encode_iterator_state`."""
    kind = blob.get("kind")
    if kind == "none":
        return None
    if kind == "bytes":
        return base64.b64decode(blob["value"])
    if kind == "json":
        return blob["value"]
    raise ValueError(f"unknown data iterator state kind {kind!r} in checkpoint")


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serializable")


@dataclasses.dataclass(frozen=True)
class DataShards:
    """Data iterator states by shard: the run reads its data as `count` shards and `states` maps
    the indices of the shards this process reads to their iterator states."""

    count: int
    states: Mapping[int, Any]

    def __post_init__(self):
        bad = [i for i in self.states if not 0 <= i < self.count]
        if self.count < 1 or bad:
            raise ValueError(f"data shard indices {bad} are not in [0, {self.count})")


def _shard_file(index: int, count: int) -> str:
    return f"shard_{index}-of-{count}.json"


class DataShardsHandler(ocp.CheckpointHandler):
    """Orbax handler of the ``data`` item: every process writes one JSON file per data shard it
    reads and reads back the files of its shards (Orbax's JSON handler writes from process 0
    only, which would drop the other processes' iterator states)."""

    def save(self, directory, args: DataShardsSave) -> None:
        for index, blob in args.states.items():
            (directory / _shard_file(index, args.count)).write_text(json.dumps(blob))

    def restore(self, directory, args: DataShardsRestore) -> DataShards:
        saved: dict[int, set[int]] = {}  # shard count -> indices found
        for path in directory.iterdir():
            match = DATA_SHARD_FILE.fullmatch(path.name)
            if match:
                saved.setdefault(int(match[2]), set()).add(int(match[1]))
        if not saved:
            return DataShards(args.count, {})  # saved from an iterator without a state
        if set(saved) != {args.count}:
            raise ValueError(
                f"{directory}: the data iterator states were saved by a run reading {sorted(saved)} data shard(s) "
                f"but this run reads {args.count}. The data shards are one per process unless data.num_shards "
                f"is set: resume with the saved process count, or with data.num_shards={max(saved)} and a process "
                "count that divides it")
        missing = sorted(set(args.indices) - saved[args.count])
        if missing:
            raise ValueError(f"{directory}: no iterator state for data shard(s) {missing} of {args.count}")
        return DataShards(args.count, {i: decode_iterator_state(json.loads(
            (directory / _shard_file(i, args.count)).read_text())) for i in args.indices})

    def metadata(self, directory) -> None:
        del directory
        return None

    def finalize(self, directory) -> None:
        del directory

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
    """count: data shards of the run; states: `{shard index: encode_iterator_state(...)}` of this
    process's shards."""

    count: int
    states: Mapping[int, Any]


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
    """count: data shards of the restoring run; indices: the shards this process reads."""

    count: int
    indices: tuple[int, ...]


def this_process_shard(state: Any) -> DataShards:
    """A single iterator state as the states of a one-shard-per-process run."""
    return DataShards(jax.process_count(), {jax.process_index(): state})


@dataclasses.dataclass
class Restored:
    """What `TrainCheckpoints.restore` returns."""

    step: int
    state: TrainState
    data_state: Any  # see `TrainCheckpoints.restore`
    run_config: dict[str, Any]


class TrainCheckpoints:
    """Saves and restores training checkpoints under `directory` (see module docstring)."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = orbax_dir(directory)
        self.cfg = cfg
        keep: list = [policies.LatestN(n=cfg.keep)]
        if cfg.keep_best:
            metric = cfg.best_metric
            keep.append(policies.BestN(
                get_metric_fn=lambda m: float(m[metric]),
                # BestN keeps the last n after sorting; descending order puts the minimum last.
                reverse=cfg.best_mode == "min",
                n=cfg.keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides when to save
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: Any,
        run_config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts saving `state` + `data_state` + `run_config` as checkpoint `step`.

        `data_state` is a `DataShards` (the states of the data shards this process reads), a
        single iterator state (this process's shard of a one-shard-per-process run) or None (no
        iterator state). `metrics` (if it holds `best_metric`) ranks the checkpoint for
        keep-best. Returns False when `step` is already saved. Call `wait()` before reading the
        checkpoint back. Every process of a multi-process run must call it.
        """
        if step in self._manager.all_steps():
            return False
        best = None
        if metrics is not None and self.cfg.best_metric in metrics:
            best = {self.cfg.best_metric: float(metrics[self.cfg.best_metric])}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=_data_save_args(data_state),
            config=ocp.args.JsonSave(json.loads(json.dumps(dict(run_config), default=_json_default))),
        )
        custom = {"metrics": best, "best_mode": self.cfg.best_mode} if best else None
        return bool(self._manager.save(step, args=args, metrics=best, force=True, custom_metadata=custom))

    def restore(self, target: TrainState, step: int | None = None,
                data_shards: tuple[int, tuple[int, ...]] | None = None) -> Restored:
        """Restores checkpoint `step` (default: the latest) into `target`, a TrainState of
        `jax.ShapeDtypeStruct`s whose shardings say where each array goes.

        `data_shards` = (shard count, indices of this process's shards) gives `data_state` as
        a `DataShards`; None (one shard per process) gives this process's single iterator state
        (None when the checkpoint holds none). A different saved shard count is a ValueError.
        Every process of a multi-process run must call it.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        count, indices = data_shards or (jax.process_count(), (jax.process_index(),))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=DataShardsRestore(count, tuple(indices)),
            config=ocp.args.JsonRestore(),
        )
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            _drop_abandoned_reads()
            raise ValueError(f"{self.directory / str(step)}: cannot restore it for this run: {e}") from e
        except Exception:
            _drop_abandoned_reads()
            raise
        data: DataShards = out.data
        if data_shards is None:
            return Restored(step, out.state, data.states.get(jax.process_index()), dict(out.config))
        return Restored(step, out.state, data if data.states else None, dict(out.config))

    def read_run_config(self, step: int) -> dict[str, Any]:
        """The run config saved with checkpoint `step` (ValueError naming the file if unreadable)."""
        path = self.directory / str(step) / "config"
        try:
            with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
                config = reader.restore(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"{path}: cannot read the saved run config: {type(e).__name__}: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path}: the saved run config is a {type(config).__name__}, not a JSON object")
        return config

    def set_aside(self, step: int, why: str) -> Path:
        """Moves an unusable checkpoint `step` out of the way (never deletes it) so the run can
        resume from an earlier one and save `step` again; writes `why` next to it."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unusable"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.unusable-{n}"
        if jax.process_index() == 0:
            os.replace(src, dst)
            (dst / "WHY_UNUSABLE.txt").write_text(why + "\n")
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"nvlm_jax.checkpoint.set_aside:{step}")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        """Blocks until pending saves are complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _drop_abandoned_reads() -> None:
    """Silences the read tasks a failed Orbax restore leaves behind: their finalizers (now, and
    later from Orbax's threads) print dozens of "Event loop is closed" tracebacks that would bury
    the one error saying what is wrong. Installs, once per process, an unraisable-exception hook
    that drops exactly those (abandoned coroutines, a closed event loop) and passes on the rest."""
    import gc
    import sys

    if not getattr(sys.unraisablehook, "_nvlm_quiet", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_abandoned_read(unraisable):
                previous(unraisable)

        hook._nvlm_quiet = True
        sys.unraisablehook = hook
    gc.collect()


def _is_abandoned_read(unraisable) -> bool:
    import inspect

    return inspect.iscoroutine(unraisable.object) or "Event loop is closed" in str(unraisable.exc_value)


def _data_save_args(data_state: Any) -> DataShardsSave:
    if data_state is None:
        return DataShardsSave(jax.process_count(), {})
    shards = data_state if isinstance(data_state, DataShards) else this_process_shard(data_state)
    # Encoded now: the iterators move on while the save completes in the background.
    return DataShardsSave(shards.count, {i: encode_iterator_state(s) for i, s in shards.states.items()})
