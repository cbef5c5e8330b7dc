"""Converting decoder-layer params between the stacked and the per-layer layout.

Checkpoints and training hold the decoder layers stacked (`llm/layers`, leaves `[layers, ...]`,
run by `lax.scan`). For NVLM-D inference on CPU the per-layer layout (`llm/layer_0` ...,
`NVLMConfig.layer_layout = "per_layer"`) decodes faster: XLA:CPU copies each layer's slice out of
a stacked weight before multiplying (a bf16 stack through f32), and those copies cost more than
the products (BUILD_NOTES, "Decoder layout for CPU inference"). Both layouts compute the same function.
"""

from __future__ import annotations

from typing import Any, Literal

import jax

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings

Layout = Literal["stacked", "per_layer"]


def auto_layout(cfg: NVLMConfig) -> Layout:
    """The faster layout for inference here: per-layer for NVLM-D on CPU, else stacked (GPU/TPU
    compilers read a stacked layer in place, and a scan compiles one layer for all)."""
    return "per_layer" if cfg.arch == "D" and jax.default_backend() == "cpu" else "stacked"


def to_layout(params: dict[str, Any], cfg: NVLMConfig, layout: Layout, mesh: jax.sharding.Mesh | None = None,
              rules: LogicalRules = DEFAULT_RULES) -> tuple[NVLMConfig, dict[str, Any]]:
    """`(cfg, params)` with the decoder layers held in `layout`. Each source leaf is deleted once
    converted, so device memory holds at most one extra leaf's worth; with `mesh`, the new leaves
    are placed by the new layout's shardings."""
    if layout == cfg.layer_layout:
        return cfg, params
    new_cfg = cfg.replace(layer_layout=layout)  # validates (per-layer is NVLM-D only)
    llm = dict(params["llm"])
    n = cfg.llm.num_layers
    if layout == "per_layer":
        if "layers" not in llm:
            raise ValueError("params lack llm/layers: they are not in the stacked layout")
        stacked = llm.pop("layers")
        layers = [{} for _ in range(n)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
            if leaf.shape[:1] != (n,):
                raise ValueError(f"llm/layers{jax.tree_util.keystr(path)}: shape {leaf.shape} has no leading "
                                 f"axis of the config's {n} layers")
            for i in range(n):
                _put(layers[i], path, leaf[i])
            leaf.delete()
        llm.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    else:
        names = [f"layer_{i}" for i in range(n)]
        missing = [k for k in names if k not in llm]
        if missing:
            raise ValueError(f"params lack {['llm/' + k for k in missing]}: they are not in the per-layer layout")
        per_layer = [llm.pop(k) for k in names]
        llm["layers"] = jax.tree_util.tree_map(lambda *xs: _stack_and_free(xs), *per_layer)
    out = dict(params, llm=llm)
    if mesh is not None:
        shardings = tree_shardings(nvlm_model.abstract_params(new_cfg), mesh, rules)
        out["llm"] = jax.device_put(out["llm"], shardings["llm"])
    return new_cfg, out


def _put(tree: dict, path, value) -> None:
    keys = [str(getattr(k, "key", k)) for k in path]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _stack_and_free(xs):
    out = jax.numpy.stack(xs)
    for x in xs:
        x.delete()
    return out
