"""InternViT against transformers' InternVLVisionModel, and the dummy-head / QK-norm semantics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nvlm_jax import config as C
from nvlm_jax.models.intern_vit import InternViT
from nvlm_jax.weight_map import params_from_tensors
from tests import torch_reference as ref

VIT = C.VisionConfig(hidden_size=48, num_layers=2, num_heads=3, intermediate_size=96,
                     image_size=28, patch_size=7, layer_scale_init=0.5)


def _cfg(vit):
    scale = 2
    return C.tiny("D").replace(vision=vit, projector=dataclasses.replace(
        C.tiny("D").projector, input_size=vit.hidden_size * scale**2))


def _convert(torch_model, vit, layout="hf_internvl_vision", tensors=None):
    cfg = _cfg(vit)
    tensors = ref.state_numpy(torch_model) if tensors is None else tensors
    return params_from_tensors(tensors, cfg, layout, ref.expected_shapes(cfg), subtree=("vision",))


def _pixels(n=3, size=28, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("norm_type", ["rms_norm", "layer_norm"])
def test_matches_transformers_internvl_vision(norm_type):
    vit = dataclasses.replace(VIT, norm_type=norm_type)
    model = ref.torch_vit(vit, seed=5)
    params = _convert(model, vit)
    px = _pixels()
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).last_hidden_state
    got = InternViT(vit).apply({"params": params}, jnp.asarray(px))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-4, rtol=0)


def _pad_heads(tensors, vit, dummy):
    """The release layout: fused qkv with `dummy` zero heads appended to each of Q, K, V, and
    q/k-norm weights and proj columns zero-padded likewise."""
    out = {}
    d = vit.head_dim
    for key, w in tensors.items():
        key2 = (key.replace("encoder.layer.", "encoder.layers.").replace("attention.", "attn.")
                .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
                .replace("lambda_1", "ls1").replace("lambda_2", "ls2")
                .replace("projection_layer", "proj").replace("embeddings.cls_token", "embeddings.class_embedding")
                .replace("embeddings.position_embeddings", "embeddings.position_embedding")
                .replace("patch_embeddings.projection", "patch_embedding"))
        if ".attn.q_proj.weight" in key2:
            blocks = [tensors[key.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
            padded = [np.concatenate([b, np.zeros((dummy * d, b.shape[1]), b.dtype)]) for b in blocks]
            out[key2.replace("q_proj", "qkv")] = np.concatenate(padded)
        elif ".attn.k_proj." in key2 or ".attn.v_proj." in key2:
            continue
        elif key2.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
            out[key2] = np.concatenate([w, np.zeros(dummy * d, w.dtype)])
        elif key2.endswith("attn.proj.weight"):
            out[key2] = np.concatenate([w, np.zeros((w.shape[0], dummy * d), w.dtype)], axis=1)
        else:
            out[key2] = w
    return out


def test_zero_dummy_heads_in_release_layout_give_the_unpadded_output():
    model = ref.torch_vit(VIT, seed=6)
    px = _pixels(seed=1)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).last_hidden_state
    padded_cfg = dataclasses.replace(VIT, num_dummy_heads=5)
    tensors = _pad_heads(ref.state_numpy(model), VIT, 5)
    assert tensors["encoder.layers.0.attn.qkv.weight"].shape == (3 * 8 * 16, 48)
    params = _convert(None, padded_cfg, layout="internvit", tensors=tensors)
    got = InternViT(padded_cfg).apply({"params": params}, jnp.asarray(px))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-4, rtol=0)


def test_qk_norm_variance_ignores_dummy_heads():
    # Non-zero garbage in the dummy heads' q/k must not change the real heads' normalisation.
    cfg = dataclasses.replace(VIT, num_dummy_heads=1)
    params = InternViT(cfg).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    params = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x, params,
                                    is_leaf=lambda x: hasattr(x, "names"))
    attn = params["layers"]["attn"]
    assert np.all(np.asarray(attn["qkv"]["kernel"][:, :, :, 3:]) == 0), "dummy heads init to 0"
    px = jnp.asarray(_pixels(1))
    base = InternViT(cfg).apply({"params": params}, px)
    k = attn["qkv"]["kernel"]
    attn["qkv"]["kernel"] = k.at[:, :, :2, 3:].set(1.0)  # dummy q and k rows non-zero
    attn["proj"]["kernel"] = attn["proj"]["kernel"].at[3:].set(0.0)  # ...but not read out
    attn["q_norm"] = attn["q_norm"].at[3:].set(0.0)
    attn["k_norm"] = attn["k_norm"].at[3:].set(0.0)
    got = InternViT(cfg).apply({"params": params}, px)
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), atol=1e-5)


def test_select_layer_minus_two_skips_the_last_layer():
    model = ref.torch_vit(VIT, seed=7)
    params = _convert(model, VIT)
    px = _pixels(seed=2)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    cfg = dataclasses.replace(VIT, select_layer=-2)
    got = InternViT(cfg).apply({"params": params}, jnp.asarray(px))
    np.testing.assert_allclose(np.asarray(got), out.hidden_states[-2].numpy(), atol=2e-4, rtol=0)


def test_other_tile_sizes_need_interpolation_flag():
    params = InternViT(VIT).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    with pytest.raises(ValueError, match="interpolate_pos_embed"):
        InternViT(VIT).apply({"params": params}, jnp.zeros((1, 42, 42, 3)))
    cfg = dataclasses.replace(VIT, interpolate_pos_embed=True)
    out = InternViT(cfg).apply({"params": params}, jnp.zeros((2, 42, 42, 3)))
    assert out.shape == (2, 1 + 36, 48)
    same = InternViT(cfg).apply({"params": params}, jnp.zeros((2, 28, 28, 3)))
    ref_out = InternViT(VIT).apply({"params": params}, jnp.zeros((2, 28, 28, 3)))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(ref_out))
