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
from tests.models.cache_hlo import whole_cache_copies

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


# ---- NVLM-X and NVLM-H ------------------------------------------------------------------------

from tests.models.xh_inputs import TAG_TOKENS, build_row  # noqa: E402


def _xh_batch(cfg, tiles_per_image, slots, seed=0):
    row = build_row(cfg.arch, tiles_per_image, cfg.num_image_tokens, cfg.image_context_token_id, slots, seed=seed)
    pixels = np.random.default_rng(seed + 100).standard_normal((1, slots, 28, 28, 3)).astype(np.float32)
    pixels[0, ~row["tile_valid"]] = 0
    batch = {k: jnp.asarray(v[None]) for k, v in row.items() if isinstance(v, np.ndarray)}
    return row, jnp.asarray(pixels), batch


def _apply(cfg, params, pixels, batch, **kw):
    return nvlm.NVLM(cfg).apply({"params": params}, batch["input_ids"], pixels, batch["tile_valid"],
                                tile_image=batch["tile_image"], token_image=batch["token_image"],
                                token_tile=batch["token_tile"], **kw)


def _open_gates(params, value=1.0):
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["xattn"]["attn_gate"] = jnp.full_like(params["xattn"]["attn_gate"], value)
    params["xattn"]["ffn_gate"] = jnp.full_like(params["xattn"]["ffn_gate"], value)
    return params


@pytest.fixture(scope="module")
def x_setup():
    cfg = C.tiny("X")
    return cfg, nvlm.init_params(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def h_setup():
    cfg = C.tiny("H", max_tag_tokens=TAG_TOKENS + 1)
    return cfg, nvlm.init_params(cfg, jax.random.key(2))


def test_x_at_init_equals_the_text_only_llm_exactly(x_setup):
    cfg, params = x_setup
    _, pixels, batch = _xh_batch(cfg, [3, 1], slots=5)
    got, _ = _apply(cfg, params, pixels, batch)
    from nvlm_jax.models.llm import LLM

    want, _ = LLM(cfg.llm).apply({"params": params["llm"]}, batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_h_at_init_equals_d_with_thumbnails_only(h_setup):
    cfg, params = h_setup
    row, pixels, batch = _xh_batch(cfg, [3, 1], slots=5)
    got, _ = _apply(cfg, params, pixels, batch)
    thumbs = [2, 3]  # last slot of each image
    d_cfg = cfg.replace(arch="D", xattn_every=None)
    d_params = {k: v for k, v in params.items() if k != "xattn"}
    want, _ = nvlm.NVLM(d_cfg).apply({"params": d_params}, batch["input_ids"], pixels[0, thumbs])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("arch", ["X", "H"])
def test_tile_k_reaches_its_tag_and_later_text_only(arch):
    # One block after all decoder layers: nothing mixes after the cross-attention, so the
    # hidden states show exactly which tokens see which tile.
    cfg = C.tiny(arch, xattn_every=2, max_tag_tokens=TAG_TOKENS)
    params = _open_gates(nvlm.init_params(cfg, jax.random.key(3)))
    row, pixels, batch = _xh_batch(cfg, [3, 2], slots=6, seed=4)
    _, _, base = _apply(cfg, params, pixels, batch, return_hidden=True)
    k = 1  # a regular tile of image 0
    moved = pixels.at[0, k].add(3.0)
    _, _, after = _apply(cfg, params, moved, batch, return_hidden=True)
    changed = np.abs(np.asarray(after - base)[0]).max(axis=-1) > 1e-6
    tags = row["tag_positions"]
    assert changed[tags[k]].all(), "the tag of tile k must see tile k"
    for j, pos in tags.items():
        if j != k:
            assert not changed[pos].any(), f"the tag of tile {j} must not see tile {k}"
    assert not changed[: row["image_start"][0]].any(), "tokens before the image see nothing of it"
    tag_tokens = {p for pos in tags.values() for p in pos}
    later_text = [i for i in range(row["image_start"][0] + 1, len(changed))
                  if i not in tag_tokens and row["input_ids"][i] != cfg.image_context_token_id]
    assert changed[later_text].all(), "text after the image sees all its tiles"


def test_text_between_images_does_not_see_the_later_image(x_setup):
    cfg, params = x_setup
    cfg = cfg.replace(xattn_every=2)
    params = _open_gates(nvlm.init_params(cfg, jax.random.key(5)))
    row, pixels, batch = _xh_batch(cfg, [2, 2], slots=4, seed=6)
    _, _, base = _apply(cfg, params, pixels, batch, return_hidden=True)
    _, _, after = _apply(cfg, params, pixels.at[0, 3].add(3.0), batch, return_hidden=True)
    changed = np.abs(np.asarray(after - base)[0]).max(axis=-1) > 1e-6
    assert not changed[: row["image_start"][1]].any()


@pytest.mark.parametrize("arch", ["X", "H"])
def test_padding_tile_slots_do_not_change_the_result(arch):
    cfg = C.tiny(arch, max_tag_tokens=TAG_TOKENS)
    params = _open_gates(nvlm.init_params(cfg, jax.random.key(7)), 0.5)
    _, pixels, batch = _xh_batch(cfg, [2, 1], slots=3, seed=8)
    base, _ = _apply(cfg, params, pixels, batch)
    _, pixels5, batch5 = _xh_batch(cfg, [2, 1], slots=5, seed=8)
    pixels5 = pixels5.at[0, :3].set(pixels[0]).at[0, 3:].set(9.0)  # junk in padding slots
    padded, _ = _apply(cfg, params, pixels5, batch5)
    np.testing.assert_allclose(np.asarray(padded), np.asarray(base), atol=1e-5)


def test_empty_cross_attention_rows_are_finite_with_finite_gradients(x_setup):
    cfg, params = x_setup
    params = _open_gates(params)
    _, pixels, batch = _xh_batch(cfg, [2], slots=2)

    def loss(p):
        return _apply(cfg, p, pixels, batch)[0].sum()

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("arch", ["X", "H"])
def test_cached_decode_with_precomputed_image_memory_equals_full_forward(arch):
    from nvlm_jax.models.llm import init_cache

    cfg = C.tiny(arch, max_tag_tokens=TAG_TOKENS)
    params = _open_gates(nvlm.init_params(cfg, jax.random.key(9)), 0.7)
    _, pixels, batch = _xh_batch(cfg, [3], slots=3, seed=10)
    full, _ = _apply(cfg, params, pixels, batch)
    model = nvlm.NVLM(cfg)
    context = model.apply({"params": params}, batch["input_ids"], pixels, batch["tile_valid"], batch["tile_image"],
                          batch["token_tile"], method=nvlm.NVLM.encode)
    s = batch["input_ids"].shape[1]
    prefix = s - 3
    cache = init_cache(cfg.llm, 1, s, jnp.float32)
    cut = {k: v[:, :prefix] for k, v in batch.items() if k in ("input_ids", "token_image", "token_tile")}
    steps = []
    out, cache = model.apply({"params": params}, cut["input_ids"], image_context=context,
                             token_image=cut["token_image"], token_tile=cut["token_tile"], cache=cache)
    steps.append(out)
    for t in range(prefix, s):
        out, cache = model.apply({"params": params}, batch["input_ids"][:, t:t + 1],
                                 image_context=context.memory_only(),
                                 token_image=batch["token_image"][:, t:t + 1],
                                 token_tile=batch["token_tile"][:, t:t + 1], cache=cache, cache_index=t)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=2e-5)
    # Decoding writes into the cache in place, cross-attention groups included (no whole-cache copy).
    last = {k: v[:, -1:] for k, v in batch.items() if k in ("input_ids", "token_image", "token_tile")}
    step = jax.jit(lambda p, c: model.apply({"params": p}, last["input_ids"], image_context=context.memory_only(),
                                            token_image=last["token_image"], token_tile=last["token_tile"],
                                            cache=c, cache_index=s - 1), donate_argnums=1)
    whole = whole_cache_copies(step.lower(params, cache).compile().as_text(), cache["k"].shape)
    assert not whole, whole[:3]
    # bf16 (its cache held as raw bits): no whole copy either, nor a conversion to or from the bits.
    model16 = nvlm.NVLM(cfg.replace(dtype="bfloat16"))
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    step16 = jax.jit(lambda p, c: model16.apply({"params": p}, last["input_ids"], image_context=context.memory_only(),
                                                token_image=last["token_image"], token_tile=last["token_tile"],
                                                cache=c, cache_index=s - 1), donate_argnums=1)
    bits = init_cache(cfg.llm, 1, s, jnp.bfloat16)
    assert bits["k"].dtype == jnp.uint16
    whole = whole_cache_copies(step16.lower(params16, bits).compile().as_text(), cache["k"].shape, "bfloat16")
    assert not whole, whole[:3]


@pytest.mark.parametrize("arch", ["X", "H"])
def test_tiny_xh_param_count_equals_the_tree(arch):
    cfg = C.tiny(arch)
    leaves = jax.tree_util.tree_leaves(nvlm.abstract_params(cfg))
    assert C.param_count(cfg) == sum(x.size for x in leaves)
    names = nvlm.abstract_params(cfg)["xattn"]["q_proj"]["kernel"].names
    assert names == ("layer_groups", "embed", "q_heads", "head_dim")
