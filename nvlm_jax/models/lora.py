"""LoRA adapters as params: which leaves they are, fresh adapters for a model, merging them into
the base weights, and saving / restoring them on their own.

The adapters live in the model's param tree next to the kernel they adapt (`lora_a`, `lora_b`;
see `nvlm_jax.models.linear.Linear`), created by the model itself when `NVLMConfig.lora.rank`
> 0, so shapes, logical axes, sharding and stacking over layers come from one place. The
scale `alpha / rank` is not a param: it is in the model config, which travels with every
checkpoint.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LoraConfig, NVLMConfig
from nvlm_jax.models import nvlm
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings

ADAPTER_LEAVES = ("lora_a", "lora_b")
CONFIG_FILE = "lora_config.json"


def _name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def adapter_mask(params: Any) -> Any:
    """A bool tree like `params`: True at the adapter leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _name(path) in ADAPTER_LEAVES, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )


def has_adapters(params: Any) -> bool:
    return any(jax.tree_util.tree_leaves(adapter_mask(params)))


def adapters(params: Any) -> dict[str, Any]:
    """The adapter leaves of `params` as a nested dict of the same paths (nothing else)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key in ADAPTER_LEAVES:
            out[key] = value
        elif isinstance(value, dict):
            sub = adapters(value)
            if sub:
                out[key] = sub
    return out


def without_adapters(params: Any) -> Any:
    """`params` with every adapter leaf removed."""
    if not isinstance(params, dict):
        return params
    return {k: without_adapters(v) for k, v in params.items() if k not in ADAPTER_LEAVES}


def with_adapters(base: Any, adapter_tree: Any) -> Any:
    """`base` with the leaves of `adapter_tree` added at their paths (a path of `adapter_tree`
    that `base` lacks is an error naming it)."""
    out = dict(base)
    for key, value in adapter_tree.items():
        if key in ADAPTER_LEAVES:
            out[key] = value
        elif key not in base or not isinstance(base[key], dict):
            raise ValueError(f"adapter path {key!r} has no matching module in the base params")
        else:
            out[key] = with_adapters(base[key], value)
    return out


def init_adapters(cfg: NVLMConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None,
                  rules: LogicalRules = DEFAULT_RULES) -> dict[str, Any]:
    """Fresh adapters of model `cfg` (A random, B zero), sharded over `mesh` when given.

    The whole model's init is traced but only the adapters are returned, so XLA drops the base
    weights' initialisers: this costs adapter memory only, at any model size."""
    if not cfg.lora.rank:
        raise ValueError("init_adapters: the model config has lora.rank = 0 (no adapters)")
    return nvlm.init_params(cfg, rng, mesh, rules, select=adapters)


def _delta(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * A·B` in the kernel's shape (f32). Leading stacked-layer axes are shared by all
    three; the kernel is `[lead..., in..., out...]`, A `[lead..., in..., r]`, B `[lead..., r, out...]`."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    if lead < 0 or a.shape[:lead] != kernel.shape[:lead] or a.shape[-1] != b.shape[lead]:
        raise ValueError(f"adapter shapes A {a.shape}, B {b.shape} do not fit kernel {kernel.shape}")
    lead_shape = kernel.shape[:lead]
    n_in = math.prod(a.shape[lead:-1])
    n_out = math.prod(b.shape[lead + 1 :])
    a2 = a.astype(jnp.float32).reshape(*lead_shape, n_in, a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*lead_shape, b.shape[lead], n_out)
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return (d * scale).reshape(kernel.shape)


def merge(params: Any, cfg: NVLMConfig) -> tuple[Any, NVLMConfig]:
    """(params with each adapter folded into its kernel, `W + (alpha / rank) A·B`, and the
    adapters removed; the config without LoRA). The merged model's logits equal the adapted
    model's up to float rounding."""
    if not cfg.lora.rank:
        raise ValueError("merge: the model config has lora.rank = 0 (nothing to merge)")
    scale = cfg.lora.scale

    def fold(tree, where):
        if not isinstance(tree, dict):
            return tree
        out = {k: fold(v, f"{where}/{k}") for k, v in tree.items() if k not in ADAPTER_LEAVES}
        if "lora_a" in tree or "lora_b" in tree:
            if not {"lora_a", "lora_b", "kernel"} <= set(tree):
                raise ValueError(f"{where}: adapter without its kernel or its other half (keys {sorted(tree)})")
            kernel = tree["kernel"]
            out["kernel"] = (kernel.astype(jnp.float32) + _delta(kernel, tree["lora_a"], tree["lora_b"], scale)
                             ).astype(kernel.dtype)
        return out

    merged = jax.jit(lambda p: fold(p, ""))(params)
    return merged, cfg.replace(lora=LoraConfig())


# ---- on their own on disk ---------------------------------------------------------------------------


def save_adapters(directory, params: Any, cfg: NVLMConfig) -> None:
    """Writes the adapters of `params` (Orbax) and the LoRA config (`lora_config.json`) to
    `directory` (must not exist). Atomic on a local disk: both are written into a hidden sibling
    folder that is renamed to `directory` when complete, so a crash leaves no half-saved adapters
    under the name (a leftover `.<name>.partial-*` folder is safe to delete)."""
    import os

    import orbax.checkpoint as ocp

    from nvlm_jax.checkpoint.paths import orbax_dir

    tree = adapters(params)
    if not tree:
        raise ValueError("save_adapters: the params hold no LoRA adapters")
    path = orbax_dir(directory)
    if path.exists():
        raise ValueError(f"save_adapters: {path} already exists")
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(partial, tree, force=True)
        ckptr.wait_until_finished()
    (partial / CONFIG_FILE).write_text(json.dumps(_lora_dict(cfg.lora)))
    partial.rename(path)


def _lora_dict(lora: LoraConfig) -> dict[str, Any]:
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "param_dtype": lora.param_dtype}


def read_adapter_config(directory) -> LoraConfig:
    from etils import epath

    path = epath.Path(directory) / CONFIG_FILE
    try:
        return LoraConfig(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"cannot read the LoRA config {path}: {e}") from e


def restore_adapters(directory, cfg: NVLMConfig, mesh: jax.sharding.Mesh | None = None,
                     rules: LogicalRules = DEFAULT_RULES) -> dict[str, Any]:
    """The adapters saved in `directory` for model `cfg` (whose `lora` must equal the saved
    one), restored onto `mesh` (else the default device)."""
    import orbax.checkpoint as ocp

    saved = read_adapter_config(directory)
    if saved != cfg.lora:
        raise ValueError(f"{directory}: adapters were saved with {saved}, the model config has {cfg.lora}")
    boxed = adapters(nvlm.abstract_params(cfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, boxed,
                                           is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    else:
        shardings = tree_shardings(boxed, mesh, rules)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype, sharding=s),
        boxed, shardings, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    from nvlm_jax.checkpoint.paths import orbax_dir

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(orbax_dir(directory), target)
