"""AdamW with linear warmup + cosine decay to a minimum LR, global-norm clipping and a
weight-decay mask (paper Tables 10–11: AdamW, cosine, per-arch LR max/min, warmup, betas,
weight decay, clipping).

Weight decay applies only to matrices that multiply activations: Linear/Dense ``kernel`` leaves,
the token embedding table ``embed_tokens`` (Megatron, which the paper trained with, decays it
too) and the ViT ``patch_embedding``. Everything else is not decayed: norm scales and biases,
linear biases, the layer-scale vectors ``ls1``/``ls2``, the ViT q/k norms, the ViT class and
position embeddings, and the cross-attention gates (decaying a gate would pull the block back
towards the identity). The rule is by leaf name, not by rank, because scanned layers add a
leading axis to every leaf.

The optimizer sees only the trainable tree (see `freeze.partition`): frozen leaves have no
Adam moments and are never updated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

DECAYED_LEAF_NAMES = frozenset({"kernel", "embed_tokens", "patch_embedding"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    Attributes:
      lr_max: peak learning rate, reached after `warmup_steps`.
      lr_min: final learning rate of the cosine decay (reached at `total_steps`, then held).
      warmup_steps: linear warmup from 0 to `lr_max`.
      total_steps: length of the whole schedule, warmup included.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay (multiplied by the LR, as in optax/PyTorch AdamW).
      clip_norm: global gradient-norm clip (over trainable leaves); 0 disables.
      mu_dtype: dtype of the first moment ("float32" with f32 master weights; "bfloat16" for a
        pure-bf16 run); None = the param dtype.
    """

    lr_max: float = 1e-4
    lr_min: float = 1e-5
    warmup_steps: int = 100
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    mu_dtype: str | None = None

    def __post_init__(self):
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(f"optim lr_min {self.lr_min} must be in [0, lr_max {self.lr_max}]")
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optim total_steps {self.total_steps} must exceed warmup_steps {self.warmup_steps} (>= 0)"
            )
        if self.clip_norm < 0:
            raise ValueError(f"optim clip_norm must be >= 0, got {self.clip_norm}")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate by applied-update count: 0 → lr_max linearly over `warmup_steps`, then a
    cosine to lr_min at `total_steps`, constant after."""
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(
            cfg.lr_max, cfg.total_steps, alpha=cfg.lr_min / cfg.lr_max if cfg.lr_max else 0.0
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr_max,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.lr_min,
    )


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any) -> Any:
    """A bool tree like `params`: True for the leaves that get weight decay (see module doc).

    Boxed leaves (`nn.LogicallyPartitioned`, as in abstract shapes) count as one leaf each."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in DECAYED_LEAF_NAMES,
        params,
        is_leaf=lambda x: isinstance(x, meta.AxisMetadata),
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW(schedule, decay mask). Apply it to the trainable tree only."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
