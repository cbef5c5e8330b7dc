"""Trainable masks per (arch, stage) follow the paper's Tables 10–11; partition/combine."""

import jax
import numpy as np
import pytest

from nvlm_jax.config import tiny
from nvlm_jax.train import freeze
from nvlm_jax.train.step import param_shapes


def _trained_top_keys(arch, stage):
    mask = freeze.trainable_mask(param_shapes(tiny(arch)), arch, stage)
    out = set()
    for key, sub in mask.items():
        leaves = jax.tree_util.tree_leaves(sub)
        assert all(leaves) or not any(leaves), f"{key} is partly trained"
        if all(leaves):
            out.add(key)
    return out


@pytest.mark.parametrize(
    "arch, stage, expected",
    [
        ("D", "pretrain", {"projector"}),
        ("X", "pretrain", {"xattn"}),
        ("H", "pretrain", {"projector", "xattn"}),
        ("D", "sft", {"projector", "llm"}),
        ("X", "sft", {"xattn", "llm"}),
        ("H", "sft", {"projector", "xattn", "llm"}),
        ("D", "full", {"vision", "projector", "llm"}),
        ("H", "full", {"vision", "projector", "llm", "xattn"}),
    ],
)
def test_stages_train_the_paper_subtrees_and_never_the_vit(arch, stage, expected):
    assert _trained_top_keys(arch, stage) == expected


def test_unknown_stage_top_level_key_or_nothing_to_train_are_errors():
    shapes = param_shapes(tiny("D"))
    with pytest.raises(ValueError, match="training stage"):
        freeze.trainable_mask(shapes, "D", "finetune")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        freeze.trainable_mask(dict(shapes, adapter={"w": np.zeros(2)}), "D", "sft")
    with pytest.raises(ValueError, match="trains"):
        freeze.trainable_mask({"vision": shapes["vision"], "llm": shapes["llm"]}, "X", "pretrain")


def test_partition_and_combine_round_trip():
    tree = {"llm": {"a": np.ones(2), "b": np.zeros(3)}, "projector": {"c": np.full(4, 2.0)}}
    mask = {"llm": {"a": True, "b": False}, "projector": {"c": True}}
    selected, rest = freeze.partition(tree, mask)
    assert selected["llm"]["b"] is None and rest["llm"]["a"] is None
    assert len(jax.tree_util.tree_leaves(selected)) == 2
    assert freeze.count_params(selected) == 6
    back = freeze.combine(selected, rest)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
