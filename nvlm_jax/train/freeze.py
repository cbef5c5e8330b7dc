"""Which parameters each training stage updates (paper Tables 10–11), and tree partitioning.

Stages:
  - ``"pretrain"`` (stage 1): ViT and LLM frozen; train the projector (D), the gated
    cross-attention blocks (X: params under ``"xattn"``), or both (H).
  - ``"sft"`` (stage 2): as pretraining, plus the whole LLM.
  - ``"full"``: everything, the ViT included. Not a paper stage: it is for from-scratch runs
    (e.g. the tiny CPU main job), where a frozen *random* ViT would be a poor encoder.

The ViT is frozen in both paper stages. NVLM-X's projector (one linear layer) is not in the paper's
trainable list for either stage, so it stays at its initial values as the tables say; a run that
wants it trained uses stage ``"full"`` or its own mask. The decision is made on the top-level keys of the param
tree (``"vision"``, ``"projector"``, ``"llm"``, ``"xattn"``); an unknown top-level key is an error
rather than a silent guess.

LoRA (adapter leaves `lora_a` / `lora_b`, see `nvlm_jax.models.lora`): a top-level subtree that
holds adapters trains its adapters only, its base weights frozen, whatever the stage says of it;
the other subtrees follow the stage (e.g. D sft with LoRA on the LLM: projector fully, LLM
adapters only; a ViT given adapters trains them although both paper stages freeze the ViT).

Frozen leaves are kept out of the optimizer entirely: `partition` splits the params into a
trainable tree and a frozen tree (each with ``None`` where the other has a leaf), the gradient is
taken with respect to the trainable tree only, and the optimizer state mirrors that tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from nvlm_jax.models.lora import adapter_mask, has_adapters

STAGES = ("pretrain", "sft", "full")
TOP_LEVEL_KEYS = ("vision", "projector", "llm", "xattn")

# Top-level subtrees trained in each (arch, stage).
_TRAINED: dict[tuple[str, str], frozenset[str]] = {
    ("D", "pretrain"): frozenset({"projector"}),
    ("X", "pretrain"): frozenset({"xattn"}),
    ("H", "pretrain"): frozenset({"projector", "xattn"}),
    ("D", "sft"): frozenset({"projector", "llm"}),
    ("X", "sft"): frozenset({"xattn", "llm"}),
    ("H", "sft"): frozenset({"projector", "xattn", "llm"}),
}


def trained_subtrees(arch: str, stage: str) -> frozenset[str]:
    """The top-level param keys trained by `arch` ("D", "X", "H") in `stage`."""
    if stage not in STAGES:
        raise ValueError(f"training stage must be one of {STAGES}, got {stage!r}")
    if arch not in ("D", "X", "H"):
        raise ValueError(f"arch must be one of ('D', 'X', 'H'), got {arch!r}")
    if stage == "full":
        return frozenset(TOP_LEVEL_KEYS)
    return _TRAINED[(arch, stage)]


def trainable_mask(params: Mapping[str, Any], arch: str, stage: str) -> dict[str, Any]:
    """A tree like `params` with a Python bool at each leaf: True where `stage` trains it.

    Raises ValueError for an unknown top-level key, or when the stage would train nothing
    (e.g. arch X without an ``"xattn"`` subtree).
    """
    unknown = sorted(set(params) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"param tree has unknown top-level keys {unknown}; expected some of {TOP_LEVEL_KEYS}")
    trained = trained_subtrees(arch, stage)
    if not trained & set(params) and not has_adapters(params):
        raise ValueError(
            f"arch {arch!r} stage {stage!r} trains {sorted(trained)} but the param tree only has {sorted(params)}"
        )
    mask = {}
    for key, sub in params.items():
        is_adapter = adapter_mask(sub)
        if any(jax.tree_util.tree_leaves(is_adapter)):
            mask[key] = is_adapter
        else:
            mask[key] = jax.tree_util.tree_map(lambda _, t=key in trained: t, sub)
    return mask


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """Splits `tree` by a bool `mask` of the same structure into (selected, rest), each with
    ``None`` in place of the other's leaves (None is an empty subtree to JAX, so tree maps,
    jit, optax and Orbax see only the leaves that are present)."""
    # The mask leads, so a boxed (logically partitioned) leaf of `tree` is kept whole.
    selected = jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)
    rest = jax.tree_util.tree_map(lambda m, x: None if m else x, mask, tree)
    return selected, rest


def combine(selected: Any, rest: Any) -> Any:
    """Inverse of `partition`: the leaf of `selected` where present, else the leaf of `rest`."""
    return jax.tree_util.tree_map(
        lambda a, b: b if a is None else a, selected, rest, is_leaf=lambda x: x is None
    )


def count_params(tree: Any) -> int:
    """Total number of elements over the leaves of `tree` (None leaves count 0)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
