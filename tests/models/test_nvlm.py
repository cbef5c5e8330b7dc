"""The NVLM-D composition against a torch composition of transformers modules; padding, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.models import nvlm
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh
from tests import torch_reference as ref

CFG = C.tiny("D")
CTX = CFG.image_context_token_id
N = CFG.num_image_tokens  # 4 tokens per 28-px tile


def _prompt(tiles_per_image, seed=0):
    """Token ids shaped like a real prompt: text, then per image `<Image>` + per tile a tag and
    N context tokens + `</Image>`; tags and text are arbitrary non-context ids."""
    rng = np.random.default_rng(seed)
    text = lambda n: list(rng.integers(1, CTX - 1, n))  # noqa: E731
    ids = text(5)
    for t in tiles_per_image:
        ids += text(2)
        for _ in range(t):
            ids += text(3) + [CTX] * N
        ids += text(2)
    return np.asarray(ids + text(6), np.int32)[None]


@pytest.fixture(scope="module")
def torch_and_params():
    torch_model = ref.TorchNVLMD(CFG, seed=11)
    return torch_model, ref.jax_params_for(torch_model)


def test_two_images_with_different_tile_counts_match_torch(torch_and_params):
    torch_model, params = torch_and_params
    ids = _prompt([3, 1])
    pixels = np.random.default_rng(1).standard_normal((4, 28, 28, 3)).astype(np.float32)
    want = torch_model(ids, pixels)
    got, _ = nvlm.NVLM(CFG).apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=0)


def test_padding_tiles_do_not_change_the_result(torch_and_params):
    _, params = torch_and_params
    ids = jnp.asarray(_prompt([2, 1]))
    pixels = np.random.default_rng(2).standard_normal((3, 28, 28, 3)).astype(np.float32)
    base, _ = nvlm.NVLM(CFG).apply({"params": params}, ids, jnp.asarray(pixels))
    junk = np.full((1, 28, 28, 3), 7.0, np.float32)
    bucket = np.concatenate([pixels[:1], junk, pixels[1:], junk])  # padding anywhere in the bucket
    valid = np.array([True, False, True, True, False])
    padded, _ = nvlm.NVLM(CFG).apply({"params": params}, ids, jnp.asarray(bucket), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(base), atol=1e-5)


@pytest.mark.parametrize("tiles_given", [1, 3])
def test_context_token_count_mismatch_is_an_error(torch_and_params, tiles_given):
    _, params = torch_and_params
    ids = jnp.asarray(_prompt([2]))
    pixels = jnp.zeros((tiles_given, 28, 28, 3))
    with pytest.raises(ValueError, match=r"hold 8 image context tokens .* 4\d* image tokens|hold 8 image"):
        nvlm.NVLM(CFG).apply({"params": params}, ids, pixels)


def test_text_only_forward_equals_llm(torch_and_params):
    _, params = torch_and_params
    ids = jnp.asarray(np.arange(1, 11, dtype=np.int32)[None])
    got, _ = nvlm.NVLM(CFG).apply({"params": params}, ids)
    from nvlm_jax.models.llm import LLM

    want, _ = LLM(CFG.llm).apply({"params": params["llm"]}, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharded_forward_equals_unsharded(torch_and_params):
    _, params = torch_and_params
    ids = jnp.asarray(np.concatenate([_prompt([2, 1]), _prompt([1, 2], seed=3)]))
    pixels = jnp.asarray(np.random.default_rng(4).standard_normal((6, 28, 28, 3)).astype(np.float32))
    want, _ = nvlm.NVLM(CFG).apply({"params": params}, ids, pixels)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = nvlm.shard_params(params, CFG, mesh)
    spec = sharded["llm"]["layers"]["q_proj"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got, _ = jax.jit(lambda p, i, x: nvlm.NVLM(CFG).apply({"params": p}, i, x))(sharded, ids, pixels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_init_params_sharded_over_mesh_and_count():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = nvlm.init_params(CFG, jax.random.key(0), mesh)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == C.param_count(CFG)
    emb = params["llm"]["embed_tokens"]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")
    assert len(emb.addressable_shards) == 8


def test_72b_shapes_and_dtypes_without_allocating():
    cfg = C.nvlm_d_72b().replace(param_dtype="bfloat16", dtype="bfloat16")
    shapes = nn.meta.unbox(nvlm.abstract_params(cfg))
    assert shapes["vision"]["layers"]["attn"]["qkv"]["kernel"].shape == (45, 3200, 3, 32, 128)
    assert shapes["llm"]["layers"]["k_proj"]["kernel"].shape == (80, 8192, 8, 128)
    assert shapes["projector"]["fc1"]["kernel"].shape == (12800, 29568)
    assert shapes["llm"]["lm_head"]["kernel"].dtype == jnp.bfloat16
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert total == 79_379_593_344

    def fwd(p, ids, px):
        return nvlm.NVLM(cfg).apply({"params": p}, ids, px)[0]

    ids = jax.ShapeDtypeStruct((1, 2 * 256 + 8), jnp.int32)
    px = jax.ShapeDtypeStruct((2, 448, 448, 3), jnp.float32)
    out = jax.eval_shape(fwd, shapes, ids, px)
    assert out.shape == (1, 520, 152064) and out.dtype == jnp.float32


def test_per_row_tiles_equal_flattened_tiles(torch_and_params):
    _, params = torch_and_params
    row0, row1 = _prompt([2]), _prompt([1], seed=5)
    row1 = np.pad(row1, ((0, 0), (0, row0.shape[1] - row1.shape[1])), constant_values=3)
    ids = jnp.asarray(np.concatenate([row0, row1]))
    rng = np.random.default_rng(6)
    pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
    flat, _ = nvlm.NVLM(CFG).apply({"params": params}, ids, jnp.asarray(pixels))
    rows = np.zeros((2, 2, 28, 28, 3), np.float32)
    rows[0] = pixels[:2]
    rows[1, 0] = pixels[2]
    valid = np.array([[True, True], [True, False]])
    per_row, _ = nvlm.NVLM(CFG).apply({"params": params}, ids, jnp.asarray(rows), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(flat), atol=1e-5)
    with pytest.raises(ValueError, match="hold 4 image context tokens"):
        nvlm.NVLM(CFG).apply({"params": params}, ids, jnp.asarray(rows), jnp.asarray([[True, True], [True, True]]))
