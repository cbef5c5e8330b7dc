"""Mesh construction and the logical-axis rule table."""

import jax
import pytest

from nvlm_jax import config as C
from nvlm_jax.models import nvlm
from nvlm_jax.sharding import logical_sharding, make_mesh, tree_shardings


def test_make_mesh_fills_the_rest_and_uses_auto_axes():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh(data=3, fsdp=-1, tensor=1)


def test_uneven_dimension_names_the_array_and_axis():
    mesh = make_mesh(data=1, fsdp=1, tensor=8)
    with pytest.raises(ValueError, match=r"llm/k_proj: dimension 1 \('kv_heads', size 2\)"):
        logical_sharding((64, 2, 16), ("embed", "kv_heads", "head_dim"), mesh, what="llm/k_proj")


def test_every_tiny_param_gets_a_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = tree_shardings(nvlm.abstract_params(C.tiny("D")), mesh)
    specs = {tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings)}
    assert ("tensor", "fsdp") in specs  # embedding
    assert (None, "fsdp", None, "tensor", None) in specs  # ViT fused qkv, stacked


def test_72b_on_a_tensor_axis_of_16_explains_the_head_counts():
    from jax.sharding import AbstractMesh, AxisType

    mesh = AbstractMesh((1, 1, 16), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError) as e:
        nvlm.check_mesh(C.nvlm_d_72b(), mesh)
    msg = str(e.value)
    assert "8 KV heads: a tensor axis of 16 cannot split them (use tensor in [1, 2, 4, 8])" in msg
    assert "25 heads + 7 dummy = 32" not in msg  # 32 heads do split 16 ways
    assert "llm/layers/k_proj/kernel" in msg


def test_unpadded_vit_needs_dummy_heads_or_replication():
    import dataclasses

    from jax.sharding import AbstractMesh, AxisType

    from nvlm_jax.sharding import replicate_vision_over

    cfg = C.nvlm_d_72b()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_dummy_heads=0))
    mesh = AbstractMesh((1, 1, 8), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError, match="25 heads \\+ 0 dummy = 25"):
        nvlm.check_mesh(cfg, mesh)
    nvlm.check_mesh(C.nvlm_d_72b(), mesh)  # the release's padded layout fits
    rules = replicate_vision_over("tensor")
    assert dict(rules)["vit_heads"] is None and dict(rules)["q_heads"] == "tensor"
    tree_shardings(nvlm.abstract_params(cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                                                    llm=dataclasses.replace(cfg.llm, num_layers=1))),
                   mesh, rules)
