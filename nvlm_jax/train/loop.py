"""The training loop: build or resume the state, step, log, evaluate, checkpoint, stop on
repeated non-finite steps.

Resuming: when the checkpoint folder holds a complete checkpoint, the state (params, optimizer
state, counters) and the data iterator state are restored from the latest one and training
continues from its step; the run's loss curve then continues exactly as if never interrupted
(same batches, same compiled step, same numbers). A LoRA run's checkpoints hold its trainable
params only: on resume the frozen base is re-created by the run's init (`init_params`, or the
seeded random init) and must match the fingerprint saved with the checkpoint
(`nvlm_jax.checkpoint.frozen_base`).

Multiple processes (hosts): every process runs this loop on its own rows of each global batch
(`train_iter` yields them) and takes the same decisions from the same replicated metrics;
only process 0 writes metrics, TensorBoard events and the progress bar. See
`nvlm_jax.train.multihost` for the row layout and the data shards.

Host/device overlap: each step is dispatched, then the next batch is fetched and placed while
the device computes, then the step's metrics are read back (one small transfer per step, which
also lets the loop stop right after the K-th consecutive non-finite step).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import linen as nn

from nvlm_jax.checkpoint import frozen_base
from nvlm_jax.checkpoint.paths import local_path
from nvlm_jax.config import NVLMConfig
from nvlm_jax.data.batch import validate_batch
from nvlm_jax.models import nvlm
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh
from nvlm_jax.train import flops as flops_lib
from nvlm_jax.train import multihost, resume
from nvlm_jax.train.checkpoint import CheckpointConfig, DataShards, TrainCheckpoints
from nvlm_jax.train.freeze import count_params, partition, trainable_mask, trained_subtrees
from nvlm_jax.train.metrics import MetricsLogger, NullLogger, batch_token_counts, measure_peak_flops, mfu
from nvlm_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from nvlm_jax.train.step import (
    TrainState,
    batch_sharding,
    device_batch,
    init_train_state,
    jit_train_step,
    make_train_step,
    param_shapes,
    train_state_shardings,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class CheckpointableIterator(Protocol):
    """A data iterator the loop can checkpoint (Grain iterators are). An iterator reading
    several data shards (`pipeline.ShardedIterator`) also has `num_shards` and
    `shard_indices`, and its state is `{shard index: state}`; any other iterator is this
    process's one shard of a one-shard-per-process run."""

    def __next__(self) -> Mapping[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


def data_shard_layout(train_iter) -> tuple[int, tuple[int, ...]] | None:
    """(shard count, this process's shard indices) of a multi-shard iterator, else None."""
    if not hasattr(train_iter, "num_shards"):
        return None
    return int(train_iter.num_shards), tuple(train_iter.shard_indices)


def _data_state(train_iter, layout) -> Any:
    """What `TrainCheckpoints.save` takes as the data state of `train_iter` right now."""
    state = train_iter.get_state()
    return DataShards(layout[0], state) if layout else state


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Attributes:
      num_steps: total training steps (batches) of the run, resumed parts included.
      stage: "pretrain", "sft" or "full" (see `freeze`).
      grad_accum_steps: micro-batches per step.
      log_every: write train metrics every this many steps.
      eval_every: run `evaluate` every this many steps (0 = only at the end).
      max_nonfinite: stop after this many consecutive non-finite steps.
      seed: params init seed (from-scratch runs).
      mesh: (data, fsdp, tensor) sizes, one may be -1; num_devices: use the first n devices
        (0 = all).
      peak_flops_per_device: MFU denominator; 0 = measure a bf16 matmul at start.
      allow_resume_changes: resume even when the run config changed in ways that break exact
        resumption (see `nvlm_jax.train.resume`); the changes are logged.
    """

    num_steps: int = 1000
    stage: str = "sft"
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0
    max_nonfinite: int = 5
    seed: int = 0
    mesh: tuple[int, int, int] = (1, -1, 1)
    num_devices: int = 0
    peak_flops_per_device: float = 0.0
    allow_resume_changes: bool = False

    def __post_init__(self):
        if self.num_steps < 1 or self.log_every < 1 or self.max_nonfinite < 1:
            raise ValueError(f"num_steps, log_every and max_nonfinite must be >= 1, got {self}")


class NonFiniteError(RuntimeError):
    """Raised when `max_nonfinite` consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    """state: the final TrainState; last_train / last_eval: the latest logged metrics;
    resumed_from: the checkpoint step the run started from (None = fresh)."""

    state: TrainState
    last_train: dict[str, float]
    last_eval: dict[str, float]
    resumed_from: int | None


Evaluate = Callable[[Any, int], Mapping[str, float]]
InitParams = Callable[[jax.sharding.Mesh], Any]


def build_mesh(cfg: LoopConfig) -> jax.sharding.Mesh:
    devices = jax.devices()
    if cfg.num_devices:
        if cfg.num_devices > len(devices):
            raise ValueError(f"num_devices {cfg.num_devices} > available devices {len(devices)}")
        devices = devices[: cfg.num_devices]
    return make_mesh(*cfg.mesh, devices=devices)


def train(
    model_cfg: NVLMConfig,
    loop_cfg: LoopConfig,
    optim_cfg: OptimConfig,
    ckpt_cfg: CheckpointConfig,
    workdir: str | os.PathLike,
    train_iter: CheckpointableIterator | Iterator,
    *,
    init_params: InitParams | None = None,
    evaluate: Evaluate | None = None,
    run_config: Mapping[str, Any] | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    console: bool = True,
) -> TrainResult:
    """Trains `model_cfg` on `train_iter` batches (see `nvlm_jax.data.batch`) in `workdir`.

    Args:
      init_params: `mesh -> params` for a fresh run (default: random init with `loop_cfg.seed`);
        when resuming, only called by LoRA runs (their frozen base is not in the checkpoints).
        A LoRA run with its own `init_params` saves only its trainable params when
        `run_config["init"]["checkpoint"]` names what `init_params` restores (the launcher's
        init, which loading the workdir re-creates), else its whole params.
      evaluate: `(params, step) -> {name: value}` on held-out data, logged under "eval/";
        called every `eval_every` steps and at the end.
      run_config: JSON-able description of the run saved with every checkpoint.

    Raises:
      NonFiniteError after `max_nonfinite` consecutive skipped steps (pending checkpoint writes
      are completed first, so the last good checkpoint is on disk).
    """
    # One path layer: a gs:// workdir without its backend is a named error, never a local "gs:".
    workdir = local_path(workdir, "the training workdir (metrics.jsonl and TensorBoard events are appended to)")
    mesh = build_mesh(loop_cfg)
    optimizer = make_optimizer(optim_cfg)
    shapes = param_shapes(model_cfg)
    mask = trainable_mask(shapes, model_cfg.arch, loop_cfg.stage)
    trainable_shapes, _ = partition(shapes, mask)
    state_shardings, state_shapes = train_state_shardings(model_cfg, optimizer, mask, mesh, rules)
    # The processes drift apart while they build their data pipelines and evaluators; Orbax's
    # first barrier below is a device collective that would give up after 30 s on CPU.
    multihost.barrier("train start")
    ckpts = TrainCheckpoints(workdir / CHECKPOINT_DIR, ckpt_cfg)
    run_config = dict(run_config or {}, model=model_cfg.to_dict())
    # LoRA: checkpoints hold the trainable params only, the frozen base is re-created from the
    # run's init source (`nvlm_jax.checkpoint.frozen_base`).
    trainable = frozenset(frozen_base.path_str(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m)
    slim_shapes = state_shapes.replace(params=frozen_base.select(state_shapes.params, trainable)) \
        if model_cfg.lora.rank else None
    base_init = _base_init(model_cfg, init_params, run_config)
    if init_params is None:
        def init_params(m):
            return nvlm.init_params(model_cfg, jax.random.key(loop_cfg.seed), m, rules)
    logger = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            restored = _restore_latest_usable(ckpts, state_shapes, slim_shapes, train_iter, run_config,
                                              loop_cfg.allow_resume_changes)
            resumed_from = None if restored is None else restored.step
            base = None  # the frozen-base record saved with the checkpoints (LoRA)
            if restored is not None:
                state = restored.state
                where = ckpts.directory / str(resumed_from)
                if frozen_base.RECORD_KEY in restored.run_config:
                    base = restored.run_config[frozen_base.RECORD_KEY]
                    full = init_params(mesh)
                    frozen_base.check(base, frozen_base.select(full, trainable, keep=False), str(where))
                    state = state.replace(params=frozen_base.overlay(frozen_base.select(full, trainable, keep=False),
                                                                     state.params))
                log.info("resumed from %s (step %d)", where, resumed_from)
            else:
                params = init_params(mesh)
                state = None
            if base_init is None:
                base = None
            elif base is None:  # fresh, or resumed from a checkpoint holding the whole params
                frozen = frozen_base.select(params if state is None else state.params, trainable, keep=False)
                base = frozen_base.make_record(frozen, base_init, loop_cfg.seed)
            if state is None:
                state = _jitted_state_init(model_cfg, optim_cfg, loop_cfg.stage, mesh, rules)(params)
            if base is not None:
                run_config = dict(run_config, **{frozen_base.RECORD_KEY: base})
            start = int(state.step)
            log.info("params: %d total, %d trainable (stage %s)", count_params(shapes),
                     count_params(trainable_shapes), loop_cfg.stage)
            if multihost.is_primary():
                logger = MetricsLogger(workdir, loop_cfg.num_steps, start, console=console)
            else:
                logger = NullLogger()  # same metrics as process 0's: one copy of the logs
            return _run(model_cfg, loop_cfg, optim_cfg, state, train_iter, mesh, rules, ckpts, logger, evaluate,
                        run_config, resumed_from, trainable)
    finally:
        ckpts.close()
        if logger is not None:
            logger.close()


def _base_init(model_cfg: NVLMConfig, init_params: InitParams | None, run_config: Mapping[str, Any]):
    """The init section a LoRA run's frozen base is re-created from (empty checkpoint = the
    seeded random init), or None when the run saves its whole params: no LoRA, or an
    `init_params` whose source the run config does not name (`init.checkpoint`)."""
    if not model_cfg.lora.rank:
        return None
    if init_params is None:
        return {"checkpoint": ""}
    init = run_config.get("init") or {}
    if not init.get("checkpoint"):
        log.info("LoRA run with its own init_params and no run_config init.checkpoint: its checkpoints hold the "
                 "whole params (the base cannot be re-created from the workdir alone)")
        return None
    return init


def _restore_latest_usable(ckpts: TrainCheckpoints, state_shapes, slim_shapes, train_iter,
                           run_config: Mapping[str, Any], allow_changes: bool):
    """The latest checkpoint that restores completely, its data-iterator state set on
    `train_iter`; None when there is no checkpoint (a fresh run).

    Newer checkpoints whose files cannot be read, or that lack the data-iterator state this run
    needs, are set aside (renamed `<step>.unusable`, never deleted) with a warning naming why,
    once an older one has restored. If none restores, nothing is renamed and a ValueError lists
    every step's reason (a run never silently starts over). A run config that changed in ways
    that break exact resumption is refused (`resume.ResumeConfigError`) unless `allow_changes`.
    A LoRA checkpoint saved with its trainable params only restores into `slim_shapes`."""
    layout = data_shard_layout(train_iter)
    needs_data = hasattr(train_iter, "set_state")
    unusable: list[tuple[int, str]] = []
    for step in sorted(ckpts.all_steps(), reverse=True):
        where = ckpts.directory / str(step)
        try:
            saved = ckpts.read_run_config(step)
        except ValueError as e:
            unusable.append((step, str(e)))
            continue
        changes = resume.check_resume_config(saved, run_config, str(where), allow_changes)
        if changes:
            log.warning("resuming from %s despite config changes (allow_resume_changes): %s", where, "; ".join(changes))
        try:
            slim = frozen_base.RECORD_KEY in saved and slim_shapes is not None
            restored = ckpts.restore(slim_shapes if slim else state_shapes, step=step, data_shards=layout)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails in many ways
            unusable.append((step, f"{where}: cannot restore it: {type(e).__name__}: {e}"))
            continue
        if needs_data and restored.data_state is None:
            unusable.append((step, f"{where}: it holds no data-iterator state, so the run would restart its data "
                                   "from the beginning"))
            continue
        if restored.data_state is not None:
            if not needs_data:
                raise ValueError("the checkpoint holds a data iterator state but train_iter has no set_state")
            try:
                train_iter.set_state(restored.data_state.states if layout else restored.data_state)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: its data-iterator state does not fit this run's data pipeline "
                                 f"({type(e).__name__}: {e}); was data.* changed (allow_resume_changes)? Resume "
                                 "with the saved data settings or use a new workdir") from e
        for bad, why in unusable:
            _set_aside(ckpts, bad, why)
        return restored
    if unusable:
        reasons = "; ".join(why for _, why in unusable)
        raise ValueError(f"{ckpts.directory}: no checkpoint of this run can be resumed from ({reasons}). Nothing was "
                         "changed on disk: fix the cause (e.g. the model config), or use a new workdir")
    return None


def _set_aside(ckpts: TrainCheckpoints, step: int, why: str) -> None:
    moved = ckpts.set_aside(step, why)
    log.warning("checkpoint step %d is unusable (%s); moved it to %s and resumed from an earlier one", step, why, moved)
    warnings.warn(f"checkpoint step {step} is unusable: {why}; moved to {moved}", stacklevel=3)


@functools.lru_cache(maxsize=8)
def _jitted_state_init(model_cfg: NVLMConfig, optim_cfg: OptimConfig, stage: str, mesh: jax.sharding.Mesh,
                       rules: LogicalRules):
    """params → a fresh TrainState on `mesh` (params donated), compiled once per configuration."""
    optimizer = make_optimizer(optim_cfg)
    mask = trainable_mask(param_shapes(model_cfg), model_cfg.arch, stage)
    shardings, _ = train_state_shardings(model_cfg, optimizer, mask, mesh, rules)
    return jax.jit(lambda p: init_train_state(p, optimizer, mask), out_shardings=shardings, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _jitted_step(model_cfg: NVLMConfig, optim_cfg: OptimConfig, stage: str, grad_accum_steps: int,
                 mesh: jax.sharding.Mesh, batch_size: int, rules: LogicalRules):
    """One jitted step per configuration, so repeated `train` calls in a process (resume tests,
    notebooks) reuse the compiled program."""
    optimizer = make_optimizer(optim_cfg)
    mask = trainable_mask(param_shapes(model_cfg), model_cfg.arch, stage)
    shardings, _ = train_state_shardings(model_cfg, optimizer, mask, mesh, rules)
    step = make_train_step(model_cfg, optimizer, mask, lr_schedule(optim_cfg), grad_accum_steps=grad_accum_steps)
    return jit_train_step(step, shardings, batch_sharding(mesh, batch_size))


def _global_batch(mesh: jax.sharding.Mesh, local_rows: int) -> int:
    """The global batch size when every process feeds `local_rows` rows, checked against the
    mesh (divisible by its batch axes, each process's devices holding that process's rows)."""
    global_batch = local_rows * jax.process_count()
    try:
        return multihost.check_row_layout(batch_sharding(mesh, global_batch), local_rows)
    except ValueError as e:
        raise ValueError(f"{jax.process_count()} process(es) x {local_rows} rows per batch: {e}") from e


def _run(model_cfg, loop_cfg, optim_cfg, state, train_iter, mesh, rules, ckpts, logger, evaluate, run_config,
         resumed_from, trainable: frozenset[str]) -> TrainResult:
    step = int(state.step)
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    if step >= loop_cfg.num_steps:
        return TrainResult(state, last_train, last_eval, resumed_from)
    # A measured peak differs a little between processes; process 0's keeps their MFU equal.
    peak = loop_cfg.peak_flops_per_device or multihost.from_primary(measure_peak_flops())
    peak *= mesh.size
    trained = trained_subtrees(model_cfg.arch, loop_cfg.stage)
    has_state = hasattr(train_iter, "get_state")
    layout = data_shard_layout(train_iter)
    batch = next(train_iter)
    shape = validate_batch(batch)
    global_batch = _global_batch(mesh, shape[0])
    bshard = batch_sharding(mesh, global_batch)
    step_flops = flops_lib.batch_flops(model_cfg, global_batch, *shape[1:], trained=trained).training
    step_fn = _jitted_step(model_cfg, optim_cfg, loop_cfg.stage, loop_cfg.grad_accum_steps, mesh, global_batch, rules)
    window = dict(steps=0, seconds=0.0, text=0, image=0)
    compile_s, compile_logged = None, False
    tick = time.perf_counter()
    while step < loop_cfg.num_steps:
        text, image = batch_token_counts(batch, model_cfg.image_context_token_id, model_cfg.num_image_tokens)
        state, metrics = multihost.synced_call(step_fn, state, device_batch(batch, bshard))
        step += 1
        save_now = step % ckpts.cfg.every == 0 or step == loop_cfg.num_steps
        data_state = _data_state(train_iter, layout) if save_now and has_state else None
        batch = next(train_iter) if step < loop_cfg.num_steps else None  # overlaps the device step
        if batch is not None and validate_batch(batch) != shape:
            raise ValueError(f"batch shapes changed from {shape} to {validate_batch(batch)}; the data "
                             "pipeline must emit static shapes")
        metrics = {k: float(v) for k, v in multihost.to_host(metrics).items()}
        now = time.perf_counter()
        if compile_s is None:
            compile_s = now - tick  # the first step of the process includes compilation
        else:
            window["steps"] += 1
            window["seconds"] += now - tick
            window["text"] += text
            window["image"] += image
        tick = now
        stop = metrics["nonfinite_run"] >= loop_cfg.max_nonfinite
        if step % loop_cfg.log_every == 0 or step == loop_cfg.num_steps or stop:
            record = dict(metrics)
            # Every process counted its own rows' tokens; the throughput is of the global batch.
            text_tokens, image_tokens = multihost.sum_over_processes(np.array([window["text"], window["image"]]))
            if window["steps"]:
                secs = window["seconds"]
                record.update(
                    step_time_s=secs / window["steps"],
                    text_tokens_per_s=float(text_tokens) / secs,
                    image_tokens_per_s=float(image_tokens) / secs,
                    tflops_per_s=step_flops * window["steps"] / secs / 1e12,
                    mfu=mfu(step_flops * window["steps"], secs, peak),
                )
            if not compile_logged:
                record["first_step_s"] = compile_s
                compile_logged = True
            logger.write(step, record)
            last_train.update(record)
            window = dict(steps=0, seconds=0.0, text=0, image=0)
        if stop:
            ckpts.wait()
            raise NonFiniteError(
                f"{int(metrics['nonfinite_run'])} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient (max_nonfinite={loop_cfg.max_nonfinite}); params were not updated by them. Last good "
                f"checkpoint: step {ckpts.latest_step()} in {ckpts.directory}"
            )
        logger.advance(step)
        eval_now = evaluate is not None and (
            step == loop_cfg.num_steps or (loop_cfg.eval_every and step % loop_cfg.eval_every == 0))
        eval_metrics = None
        if eval_now:
            eval_metrics = dict(evaluate(state.params, step))
            logger.write(step, eval_metrics, prefix="eval")
            last_eval = eval_metrics
            tick = time.perf_counter()  # evaluation time is not step time
        if save_now and metrics["nonfinite_run"] == 0:
            # Only states right after an applied update are saved (never in a run of skips).
            best = {f"eval/{k}": v for k, v in eval_metrics.items()} if eval_metrics else None
            saved = state
            if frozen_base.RECORD_KEY in run_config:
                saved = state.replace(params=frozen_base.select(state.params, trainable))
            ckpts.save(step, saved, data_state, run_config, metrics=best)
    ckpts.wait()
    return TrainResult(state, last_train, last_eval, resumed_from)
