"""The one table from Hugging Face / PyTorch tensor names to our parameter paths.

Each rule maps a key pattern to a path in our params tree, a named transform from the PyTorch
layout to ours, and whether the key carries a layer index (layers are stacked on axis 0 for
`nn.scan`). Layouts:

- ``nvlm``: the released NVLM-D checkpoint (`language_model.*`, `vision_model.*`, `mlp1.*`).
- ``llm``: a standalone Qwen2/Llama causal LM (`model.*`, `lm_head.*`).
- ``internvit``: a standalone OpenGVLab InternViT (`embeddings.*`, `encoder.layers.*`).
- ``hf_internvl_vision``: transformers' native `InternVLVisionModel` (`encoder.layer.*`, separate
  q/k/v projections).

`params_from_tensors` assembles a params tree from an in-memory mapping and reports every
problem at once; the streaming converter (`nvlm_jax.checkpoint.plan`) uses the same rules one tensor at
a time. Every transform carries its exact inverse, so the same table also exports our params
back to the PyTorch layout (`layout_slots` lists the keys, `Rule.transform.inverse` lays the
tensors out). `VIT_HEAD_AXES` says where the ViT arrays keep their heads, for checking,
dropping or padding the release's zero dummy heads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from nvlm_jax.config import NVLMConfig

TransformFn = Callable[[np.ndarray, NVLMConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named layout change PyTorch → ours (`forward`, also `__call__`) and its exact `inverse`.

    Both are pure reshapes/transposes (views where NumPy allows), so they also work on
    `jax.ShapeDtypeStruct`s under `jax.eval_shape` to compute shapes without data.
    """

    name: str
    forward: TransformFn
    inverse: TransformFn

    def __call__(self, w, cfg: NVLMConfig):
        return self.forward(w, cfg)


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # regex over the HF key; a `(\d+)` group captures the layer index
    path: tuple[str, ...]  # our params path
    transform: Transform
    layered: bool = False
    # Several HF tensors may fill parts of one of ours (separate q/k/v → fused qkv):
    # `part` selects the slice of our (per-layer) array this key fills.
    part: tuple | None = None

    def key(self, layer: int | None = None) -> str:
        """The HF key this rule matches for `layer` (the inverse of the pattern)."""
        pattern = self.pattern
        if self.layered:
            if layer is None:
                raise ValueError(f"rule {self.pattern!r} needs a layer index")
            pattern = pattern.replace(r"(\d+)", str(layer))
        return re.sub(r"\\(.)", r"\1", pattern)


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]
    layer: int | None
    transform: Transform
    part: tuple | None


# ---- transforms (PyTorch layout → ours) -----------------------------------------------------


identity = Transform("identity", lambda w, cfg: w, lambda x, cfg: x)

# Linear weight (out, in) ↔ kernel (in, out).
linear_t = Transform("linear_t", lambda w, cfg: w.T, lambda x, cfg: x.T)


def _heads_out(num_heads_fn) -> Transform:
    """(out=n·d, in) ↔ (in, n, d)."""

    def fwd(w, cfg):
        return w.T.reshape(w.shape[1], num_heads_fn(cfg), -1)

    def inv(x, cfg):
        return x.reshape(x.shape[0], -1).T

    return Transform(f"heads_out[{num_heads_fn.__name__}]", fwd, inv)


def _heads_bias(num_heads_fn) -> Transform:
    """(n·d,) ↔ (n, d)."""
    return Transform(
        f"heads_bias[{num_heads_fn.__name__}]",
        lambda w, cfg: w.reshape(num_heads_fn(cfg), -1),
        lambda x, cfg: x.reshape(-1),
    )


def _heads_in(num_heads_fn) -> Transform:
    """(out, in=n·d) ↔ (n, d, out)."""

    def fwd(w, cfg):
        return w.T.reshape(num_heads_fn(cfg), -1, w.shape[0])

    def inv(x, cfg):
        return x.reshape(-1, x.shape[-1]).T

    return Transform(f"heads_in[{num_heads_fn.__name__}]", fwd, inv)


def _q_heads(cfg):
    return cfg.llm.num_heads


def _kv_heads(cfg):
    return cfg.llm.num_kv_heads


def _vit_heads(cfg):
    return cfg.vision.total_heads


def _vit_qkv_fwd(w, cfg):
    v = cfg.vision
    return w.reshape(3, v.total_heads, v.head_dim, w.shape[1]).transpose(3, 0, 1, 2)


# Fused (3·heads·d, C) ↔ (C, 3, heads, d); rows are Q block, K block, V block.
vit_qkv = Transform("vit_qkv", _vit_qkv_fwd, lambda x, cfg: x.transpose(1, 2, 3, 0).reshape(-1, x.shape[0]))

vit_qkv_bias = Transform(
    "vit_qkv_bias",
    lambda w, cfg: w.reshape(3, cfg.vision.total_heads, cfg.vision.head_dim),
    lambda x, cfg: x.reshape(-1),
)

vit_qk_norm = Transform(
    "vit_qk_norm",
    lambda w, cfg: w.reshape(cfg.vision.total_heads, cfg.vision.head_dim),
    lambda x, cfg: x.reshape(-1),
)

# Conv (out, in, kh, kw) ↔ HWIO.
patch_conv = Transform("patch_conv", lambda w, cfg: w.transpose(2, 3, 1, 0), lambda x, cfg: x.transpose(3, 2, 0, 1))


def _squeeze_fwd(w, cfg):
    return w.reshape(w.shape[-2:] if w.ndim == 3 and w.shape[1] != 1 else w.shape[-1:])


def _squeeze_inv(x, cfg):
    return x.reshape((1,) + tuple(x.shape)) if x.ndim == 2 else x.reshape((1, 1) + tuple(x.shape))


# (1, 1, C) ↔ (C,) and (1, N, C) ↔ (N, C): the release's class / position embeddings.
squeeze_leading = Transform("squeeze_leading", _squeeze_fwd, _squeeze_inv)


# ---- rule tables ----------------------------------------------------------------------------


def _llm_rules(prefix: str) -> list[Rule]:
    p = re.escape(prefix)
    layer = p + r"model\.layers\.(\d+)\."
    return [
        Rule(p + r"model\.embed_tokens\.weight", ("llm", "embed_tokens"), identity),
        Rule(p + r"model\.norm\.weight", ("llm", "norm", "scale"), identity),
        Rule(p + r"lm_head\.weight", ("llm", "lm_head", "kernel"), linear_t),
        Rule(layer + r"input_layernorm\.weight", ("llm", "layers", "input_layernorm", "scale"), identity, True),
        Rule(layer + r"post_attention_layernorm\.weight",
             ("llm", "layers", "post_attention_layernorm", "scale"), identity, True),
        Rule(layer + r"self_attn\.q_proj\.weight", ("llm", "layers", "q_proj", "kernel"), _heads_out(_q_heads), True),
        Rule(layer + r"self_attn\.k_proj\.weight", ("llm", "layers", "k_proj", "kernel"), _heads_out(_kv_heads), True),
        Rule(layer + r"self_attn\.v_proj\.weight", ("llm", "layers", "v_proj", "kernel"), _heads_out(_kv_heads), True),
        Rule(layer + r"self_attn\.q_proj\.bias", ("llm", "layers", "q_proj", "bias"), _heads_bias(_q_heads), True),
        Rule(layer + r"self_attn\.k_proj\.bias", ("llm", "layers", "k_proj", "bias"), _heads_bias(_kv_heads), True),
        Rule(layer + r"self_attn\.v_proj\.bias", ("llm", "layers", "v_proj", "bias"), _heads_bias(_kv_heads), True),
        Rule(layer + r"self_attn\.o_proj\.weight", ("llm", "layers", "o_proj", "kernel"), _heads_in(_q_heads), True),
        Rule(layer + r"mlp\.gate_proj\.weight", ("llm", "layers", "mlp", "gate_proj", "kernel"), linear_t, True),
        Rule(layer + r"mlp\.up_proj\.weight", ("llm", "layers", "mlp", "up_proj", "kernel"), linear_t, True),
        Rule(layer + r"mlp\.down_proj\.weight", ("llm", "layers", "mlp", "down_proj", "kernel"), linear_t, True),
    ]


def _vit_layer_common(layer: str, names: dict[str, str]) -> list[Rule]:
    v = ("vision", "layers")
    return [
        Rule(layer + names["norm1"] + r"\.weight", v + ("norm1", "scale"), identity, True),
        Rule(layer + names["norm1"] + r"\.bias", v + ("norm1", "bias"), identity, True),
        Rule(layer + names["norm2"] + r"\.weight", v + ("norm2", "scale"), identity, True),
        Rule(layer + names["norm2"] + r"\.bias", v + ("norm2", "bias"), identity, True),
        Rule(layer + names["ls1"], v + ("ls1",), identity, True),
        Rule(layer + names["ls2"], v + ("ls2",), identity, True),
        Rule(layer + names["proj"] + r"\.weight", v + ("attn", "proj", "kernel"), _heads_in(_vit_heads), True),
        Rule(layer + names["proj"] + r"\.bias", v + ("attn", "proj", "bias"), identity, True),
        Rule(layer + names["q_norm"] + r"\.weight", v + ("attn", "q_norm"), vit_qk_norm, True),
        Rule(layer + names["k_norm"] + r"\.weight", v + ("attn", "k_norm"), vit_qk_norm, True),
        Rule(layer + r"mlp\.fc1\.weight", v + ("fc1", "kernel"), linear_t, True),
        Rule(layer + r"mlp\.fc1\.bias", v + ("fc1", "bias"), identity, True),
        Rule(layer + r"mlp\.fc2\.weight", v + ("fc2", "kernel"), linear_t, True),
        Rule(layer + r"mlp\.fc2\.bias", v + ("fc2", "bias"), identity, True),
    ]


def _internvit_rules(prefix: str) -> list[Rule]:
    p = re.escape(prefix)
    layer = p + r"encoder\.layers\.(\d+)\."
    names = dict(norm1="norm1", norm2="norm2", ls1="ls1", ls2="ls2", proj=r"attn\.proj",
                 q_norm=r"attn\.q_norm", k_norm=r"attn\.k_norm")
    return [
        Rule(p + r"embeddings\.class_embedding", ("vision", "class_embedding"), squeeze_leading),
        Rule(p + r"embeddings\.position_embedding", ("vision", "position_embedding"), squeeze_leading),
        Rule(p + r"embeddings\.patch_embedding\.weight", ("vision", "patch_embedding"), patch_conv),
        Rule(p + r"embeddings\.patch_embedding\.bias", ("vision", "patch_bias"), identity),
        Rule(layer + r"attn\.qkv\.weight", ("vision", "layers", "attn", "qkv", "kernel"), vit_qkv, True),
        Rule(layer + r"attn\.qkv\.bias", ("vision", "layers", "attn", "qkv", "bias"), vit_qkv_bias, True),
        *_vit_layer_common(layer, names),
    ]


def _hf_internvl_vision_rules(prefix: str) -> list[Rule]:
    p = re.escape(prefix)
    layer = p + r"encoder\.layer\.(\d+)\."
    names = dict(norm1="layernorm_before", norm2="layernorm_after", ls1="lambda_1", ls2="lambda_2",
                 proj=r"attention\.projection_layer", q_norm=r"attention\.q_norm", k_norm=r"attention\.k_norm")
    qkv = ("vision", "layers", "attn", "qkv")
    rules = [
        Rule(p + r"embeddings\.cls_token", ("vision", "class_embedding"), squeeze_leading),
        Rule(p + r"embeddings\.position_embeddings", ("vision", "position_embedding"), squeeze_leading),
        Rule(p + r"embeddings\.patch_embeddings\.projection\.weight", ("vision", "patch_embedding"), patch_conv),
        Rule(p + r"embeddings\.patch_embeddings\.projection\.bias", ("vision", "patch_bias"), identity),
    ]
    for i, name in enumerate("qkv"):
        rules.append(Rule(layer + rf"attention\.{name}_proj\.weight", qkv + ("kernel",),
                          _heads_out(_vit_heads), True, part=(slice(None), i)))
        rules.append(Rule(layer + rf"attention\.{name}_proj\.bias", qkv + ("bias",),
                          _heads_bias(_vit_heads), True, part=(i,)))
    return rules + _vit_layer_common(layer, names)


def _projector_rules(prefix: str) -> list[Rule]:
    p = re.escape(prefix)
    return [
        Rule(p + r"0\.weight", ("projector", "norm", "scale"), identity),
        Rule(p + r"0\.bias", ("projector", "norm", "bias"), identity),
        Rule(p + r"1\.weight", ("projector", "fc1", "kernel"), linear_t),
        Rule(p + r"3\.weight", ("projector", "fc2", "kernel"), linear_t),
    ]


LAYOUTS = ("nvlm", "llm", "internvit", "hf_internvl_vision")


def rules_for(layout: str) -> list[Rule]:
    if layout == "nvlm":
        return _llm_rules("language_model.") + _internvit_rules("vision_model.") + _projector_rules("mlp1.")
    if layout == "llm":
        return _llm_rules("")
    if layout == "internvit":
        return _internvit_rules("")
    if layout == "hf_internvl_vision":
        return _hf_internvl_vision_rules("")
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def _compile(rules: Iterable[Rule]):
    return [(re.compile(r.pattern + "$"), r) for r in rules]


def match(key: str, compiled) -> Target | None:
    for regex, rule in compiled:
        m = regex.match(key)
        if m:
            layer = int(m.group(1)) if rule.layered else None
            return Target(rule.path, layer, rule.transform, rule.part)
    return None


def tree_get(tree, path):
    """The leaf (or subtree) of a nested dict at `path`, or None."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def tree_set(tree, path, value):
    """Sets `tree[path[0]]...[path[-1]] = value`, creating dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_from_tensors(
    tensors: Mapping[str, np.ndarray],
    cfg: NVLMConfig,
    layout: str,
    expected: Mapping | None = None,
    dtype=np.float32,
    subtree: tuple[str, ...] | None = None,
):
    """Builds our params (nested dict of numpy arrays in `dtype`) from HF-named tensors.

    expected: a tree of shapes (e.g. from `jax.eval_shape`) that fixes the target shapes and the
    set of required params; `subtree` restricts it (e.g. ("llm",) for a standalone LM).
    Raises one ValueError listing every unexpected key, wrong shape and missing param.
    """
    rules = rules_for(layout)
    compiled = _compile(rules)
    # How many keys fill each of our params (3 for q/k/v written into one fused qkv).
    parts_needed: dict[tuple[str, ...], int] = {}
    for r in rules:
        parts_needed[r.path] = parts_needed.get(r.path, 0) + 1 if r.part is not None else 1
    problems: list[str] = []
    out: dict = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    for key, w in tensors.items():
        target = match(key, compiled)
        if target is None:
            problems.append(f"unexpected key {key!r}")
            continue
        shape = tree_get(expected, target.path) if expected is not None else None
        if shape is None:
            problems.append(f"key {key!r} maps to {'/'.join(target.path)}, which this model does not have")
            continue
        shape = tuple(shape.shape if hasattr(shape, "shape") else shape)
        arr = out.get(target.path)
        if arr is None:
            arr = np.zeros(shape, dtype)
            out[target.path] = arr
            filled[target.path] = np.zeros(shape[:1] if target.layer is not None else (), np.int64)
        try:
            value = np.asarray(target.transform(np.asarray(w), cfg))
        except ValueError as e:
            problems.append(f"key {key!r}: shape {tuple(np.shape(w))} cannot be laid out as {shape}: {e}")
            continue
        index = (target.layer,) if target.layer is not None else ()
        if target.layer is not None and target.layer >= shape[0]:
            problems.append(f"key {key!r}: layer {target.layer} >= {shape[0]} layers")
            continue
        index = index + (target.part or ())
        slot = arr[index] if index else arr
        if slot.shape != value.shape:
            problems.append(
                f"key {key!r}: shape {tuple(np.shape(w))} gives {value.shape}, expected {slot.shape} "
                f"for {'/'.join(target.path)}"
            )
            continue
        if index:
            arr[index] = value
        else:
            arr[...] = value
        if target.layer is not None:
            filled[target.path][target.layer] += 1
        else:
            filled[target.path] += 1
    if expected is not None:
        flat = jax.tree_util.tree_flatten_with_path(
            tree_get(expected, subtree) if subtree else expected
        )[0]
        for kp, _ in flat:
            path = (subtree or ()) + tuple(str(getattr(k, "key", k)) for k in kp)
            if path not in out:
                problems.append(f"missing param {'/'.join(path)} (no checkpoint key maps to it)")
            elif np.any(filled[path] < parts_needed[path]):
                where = np.nonzero(np.atleast_1d(filled[path] < parts_needed[path]))[0].tolist()
                what = f"layers {where}" if filled[path].ndim else "some of its parts"
                problems.append(f"missing param {'/'.join(path)} for {what}")
    if problems:
        raise ValueError(f"{len(problems)} problem(s) mapping {layout} checkpoint:\n  " + "\n  ".join(problems))
    tree: dict = {}
    for path, arr in out.items():
        tree_set(tree, path[len(subtree):] if subtree else path, arr)
    return tree


# ---- streaming / export helpers ---------------------------------------------------------------


def compile_rules(layout: str):
    """The compiled table of `layout`, for repeated `match` calls."""
    return _compile(rules_for(layout))


# Our (per-layer, unstacked) ViT params that carry a head axis, and where it is. The release pads
# 25 real heads with zero "dummy" heads; these are the arrays whose dummy slices must be zero.
VIT_HEAD_AXES: dict[tuple[str, ...], int] = {
    ("vision", "layers", "attn", "qkv", "kernel"): 2,  # (C, 3, heads, d)
    ("vision", "layers", "attn", "qkv", "bias"): 1,  # (3, heads, d)
    ("vision", "layers", "attn", "q_norm"): 0,  # (heads, d)
    ("vision", "layers", "attn", "k_norm"): 0,
    ("vision", "layers", "attn", "proj", "kernel"): 0,  # (heads, d, C)
}


def head_axis(path: tuple[str, ...], part: tuple | None = None) -> int | None:
    """The head axis of the per-layer array a rule writes (after its `part` index), or None."""
    axis = VIT_HEAD_AXES.get(tuple(path))
    if axis is None:
        return None
    # Integer indices of `part` before the head axis remove dimensions.
    return axis - sum(1 for i, p in enumerate(part or ()) if i < axis and not isinstance(p, slice))


def heads_slice(ndim: int, axis: int, start: int, stop: int | None = None) -> tuple:
    """Index selecting heads `start:stop` along `axis` of an `ndim`-dim array."""
    index = [slice(None)] * ndim
    index[axis] = slice(start, stop)
    return tuple(index)


def resize_heads(x: np.ndarray, axis: int, total: int) -> np.ndarray:
    """Drops trailing heads (callers first check they are zero) or pads zero heads to `total`."""
    have = x.shape[axis]
    if have == total:
        return x
    if have > total:
        return x[heads_slice(x.ndim, axis, 0, total)]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, total - have)
    return np.pad(np.asarray(x), pad)


@dataclasses.dataclass(frozen=True)
class KeySlot:
    """One HF tensor of a layout and the slot of our params it fills."""

    key: str
    rule: Rule
    layer: int | None

    @property
    def path(self) -> tuple[str, ...]:
        return self.rule.path


def layout_slots(layout: str, shapes: Mapping, subtree: tuple[str, ...] | None = None) -> list[KeySlot]:
    """Every HF key `layout` has for a params tree of `shapes` (our layout), in table order.

    Rules whose param is absent from `shapes` (optional biases, an untied head) are skipped;
    `subtree` keeps only params under that path. Layer counts come from the stacked shapes.
    """
    slots = []
    for rule in rules_for(layout):
        if subtree and rule.path[: len(subtree)] != tuple(subtree):
            continue
        leaf = tree_get(shapes, rule.path)
        if leaf is None:
            continue
        if rule.layered:
            for i in range(tuple(leaf.shape)[0]):
                slots.append(KeySlot(rule.key(i), rule, i))
        else:
            slots.append(KeySlot(rule.key(), rule, None))
    return slots
