"""The training step: masked token cross-entropy, gradients of the trainable params only,
optional gradient accumulation, a skipped update on non-finite loss or gradients, AdamW.

Loss normalisation: the loss is the sum of the per-token cross-entropies over all answer tokens
(`loss_mask`) of the *global* batch, divided by their count. Every answer token weighs the same
whether its sample is packed with others in one row or alone in a row, and gradient
accumulation divides by the count of the whole global batch, so k micro-batches give the
gradient of the full batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm
from nvlm_jax.models.loss import TokenStats, token_stats
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings
from nvlm_jax.train.freeze import combine, partition

Batch = Mapping[str, jax.Array]
ApplyFn = Callable[[Any, NVLMConfig, Batch], jax.Array]


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator.

    step: batches consumed (int32 scalar); applied: optimizer updates applied (skipped steps
    excluded; the LR schedule and Adam bias correction follow it); params: the full param tree;
    opt_state: optimizer state over the trainable tree only; nonfinite_run: consecutive skipped
    steps; nonfinite_total: all skipped steps.
    """

    step: jax.Array
    applied: jax.Array
    params: Any
    opt_state: Any
    nonfinite_run: jax.Array
    nonfinite_total: jax.Array


def batch_loss(params, cfg: NVLMConfig, batch: Batch, apply_fn: ApplyFn = nvlm.apply_batch) -> jax.Array:
    """Mean cross-entropy over the answer tokens of `batch` (0 if it has none)."""
    s = token_stats(apply_fn(params, cfg, batch), batch["targets"], batch["loss_mask"])
    return s.loss_sum / jnp.maximum(s.count, 1.0)


def init_train_state(params, optimizer: optax.GradientTransformation, mask) -> TrainState:
    """A fresh state at step 0 (optimizer state over the `mask`ed-in leaves only)."""
    trainable, _ = partition(params, mask)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero, applied=zero, params=params, opt_state=optimizer.init(trainable),
        nonfinite_run=zero, nonfinite_total=zero,
    )


def _split_micro(batch: Batch, k: int) -> Batch:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return {name: split(x) for name, x in batch.items()}


def make_train_step(
    cfg: NVLMConfig,
    optimizer: optax.GradientTransformation,
    mask,
    schedule: optax.Schedule | None = None,
    *,
    grad_accum_steps: int = 1,
    apply_fn: ApplyFn = nvlm.apply_batch,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step function `(state, batch) -> (state, metrics)` (jit it, e.g. `jit_train_step`).

    `mask` is the static trainable mask (`freeze.trainable_mask`); `schedule` (if given) is only
    used to report the learning rate of the step. With `grad_accum_steps` k > 1 the batch is cut
    into k micro-batches along its rows, processed one after another with `lax.scan`.

    Metrics (f32 scalars unless noted): loss (mean over answer tokens), accuracy (argmax over
    answer tokens), loss_tokens, grad_norm (global, trainable leaves, before clipping), lr,
    finite (1 if the update was applied), nonfinite_run / nonfinite_total (int32).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

    # LoRA dropout: a key per step (and micro-batch) from the step counter, so resumes are exact.
    dropout = bool(cfg.lora.rank and cfg.lora.dropout) and apply_fn is nvlm.apply_batch

    def grads_of(trainable, frozen, batch, denom, key):
        def loss_fn(t):
            if dropout:
                logits = nvlm.apply_batch(combine(t, frozen), cfg, batch, dropout_rng=key)
            else:
                logits = apply_fn(combine(t, frozen), cfg, batch)
            stats = token_stats(logits, batch["targets"], batch["loss_mask"])
            return stats.loss_sum / denom, stats

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return stats, grads

    def step(state: TrainState, batch: Batch):
        trainable, frozen = partition(state.params, mask)
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        key = jax.random.fold_in(jax.random.key(0x10A), state.step)
        if grad_accum_steps == 1:
            stats, grads = grads_of(trainable, frozen, batch, denom, key)
        else:
            def micro(carry, xs):
                acc_stats, acc_grads = carry
                i, mb = xs
                stats, grads = grads_of(trainable, frozen, mb, denom, jax.random.fold_in(key, i))
                return (jax.tree_util.tree_map(jnp.add, acc_stats, stats),
                        jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            zero_stats = TokenStats(*(jnp.zeros((), jnp.float32),) * 3)
            (stats, grads), _ = jax.lax.scan(micro, (zero_stats, zeros),
                                             (jnp.arange(grad_accum_steps), _split_micro(batch, grad_accum_steps)))
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, trainable)
        loss = stats.loss_sum / denom
        grad_norm = optax.tree.norm(jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
            return combine(optax.apply_updates(trainable, updates), frozen), opt_state

        def skip(_):
            return state.params, state.opt_state

        params, opt_state = jax.lax.cond(finite, apply, skip, None)
        one = jnp.ones((), jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            applied=state.applied + finite.astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + one),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        lr = schedule(state.applied) if schedule is not None else jnp.float32(jnp.nan)
        metrics = {
            "loss": loss,
            "accuracy": stats.correct / denom,
            "loss_tokens": stats.count,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "finite": finite.astype(jnp.float32),
            "nonfinite_run": new_state.nonfinite_run,
            "nonfinite_total": new_state.nonfinite_total,
        }
        return new_state, metrics

    return step


# ---- shardings ----------------------------------------------------------------------------------


def strip_boxes(tree):
    """Removes logical-axis boxes without applying sharding constraints (`nn.meta.unbox` would
    constrain under an active mesh, which fails on abstract shapes)."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def param_shapes(cfg: NVLMConfig):
    """The params' `jax.ShapeDtypeStruct` tree (plain nested dict, nothing allocated)."""
    return strip_boxes(nvlm.abstract_params(cfg))


def abstract_train_state(cfg: NVLMConfig, optimizer: optax.GradientTransformation, mask):
    """The state's shapes with logical-axis boxes on params and on the Adam moments."""
    boxed = nvlm.abstract_params(cfg)
    return jax.eval_shape(lambda p: init_train_state(p, optimizer, mask), boxed)


def train_state_shardings(
    cfg: NVLMConfig,
    optimizer: optax.GradientTransformation,
    mask,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules = DEFAULT_RULES,
):
    """(shardings, shapes) of the TrainState on `mesh`: moments shard like their params,
    counters are replicated. `shapes` is a tree of `jax.ShapeDtypeStruct` carrying the shardings
    (an Orbax restore target)."""
    boxed = abstract_train_state(cfg, optimizer, mask)
    shardings = tree_shardings(boxed, mesh, rules)
    shapes = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), strip_boxes(boxed), shardings
    )
    return shardings, shapes


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int) -> jax.sharding.NamedSharding:
    """Batch arrays shard their rows over the ("data", "fsdp") mesh axes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the data x fsdp mesh size {n} "
            f"(mesh {dict(mesh.shape)})"
        )
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def jit_train_step(step_fn, state_shardings, batch_shard: jax.sharding.NamedSharding):
    """`jax.jit` of a step function with pinned state shardings; the input state is donated.
    Call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
    replicated = jax.sharding.NamedSharding(batch_shard.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def device_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Places this process's rows of the global batch (dict of NumPy arrays) on the mesh, rows
    sharded (with one process: the whole batch)."""
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x)) for name, x in batch.items()}
