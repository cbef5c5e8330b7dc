"""`load_pretrained` from a Hugging Face folder and from our Orbax folder, against torch."""

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import nvlm_jax
from tests import hf_checkpoint as hc

PIXELS = np.random.default_rng(1).standard_normal((4, 28, 28, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


@pytest.fixture(scope="module")
def from_orbax():
    return nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32")


@pytest.fixture(scope="module")
def from_hf(release):
    return nvlm_jax.load_pretrained(release.folder, dtype="float32")


def test_both_folder_kinds_give_the_torch_logits(release, from_orbax, from_hf):
    ids = hc.prompt_ids(release.cfg, [3, 1])[None]  # two images: 3 tiles (2 + thumbnail) and 1 tile
    want = release.torch_model(ids, PIXELS)
    for model in (from_orbax, from_hf):
        got = np.asarray(model.forward(ids, PIXELS))
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert from_orbax.config == from_hf.config
    leaves = zip(jax.tree_util.tree_leaves(from_orbax.params), jax.tree_util.tree_leaves(from_hf.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)


def test_greedy_continuation_matches_a_torch_greedy_loop(release, from_orbax):
    ids = hc.prompt_ids(release.cfg, [3, 1], seed=4)
    want = hc.torch_greedy(release.torch_model, ids, PIXELS, 32)
    got = from_orbax.generate(ids[None], PIXELS, max_new_tokens=32, stop_token_ids=())
    np.testing.assert_array_equal(got[0], want)


def test_text_only_forward_matches_torch(release, from_orbax):
    ids = np.arange(3, 40, dtype=np.int32)[None]
    with torch.no_grad():
        want = release.torch_model.language_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(from_orbax.forward(ids)), want, atol=2e-4, rtol=0)


def test_model_has_the_public_attributes(from_orbax):
    m = from_orbax
    assert isinstance(m.config, nvlm_jax.NVLMConfig)
    assert m.tokenizer is not None and len(m.tokenizer) == 934
    assert isinstance(m.params["llm"]["embed_tokens"], jax.Array)
    assert nvlm_jax.param_count(m.config) == sum(x.size for x in jax.tree_util.tree_leaves(m.params))


def test_forward_checks_the_image_token_count(release, from_orbax):
    ids = hc.prompt_ids(release.cfg, [2])[None]
    with pytest.raises(ValueError, match="hold 8 image context tokens .* 4 tiles x 4 tokens = 16"):
        from_orbax.forward(ids, PIXELS)


def test_bfloat16_load_stores_and_computes_in_bfloat16(release, from_orbax):
    model = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="bfloat16")
    assert model.config.dtype == model.config.param_dtype == "bfloat16"
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree_util.tree_leaves(model.params))
    ids = hc.prompt_ids(release.cfg, [3, 1])[None]
    lo, hi = np.asarray(model.forward(ids, PIXELS)), np.asarray(from_orbax.forward(ids, PIXELS))
    assert np.abs(lo - hi).max() < 0.05 * np.abs(hi).max()


def test_load_onto_a_mesh_shards_the_params(release, from_orbax):
    mesh = nvlm_jax.sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32", mesh=mesh)
    emb = model.params["llm"]["embed_tokens"]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp") and len(emb.addressable_shards) == 8
    ids = hc.prompt_ids(release.cfg, [3, 1])[None]
    np.testing.assert_allclose(np.asarray(model.forward(ids, PIXELS)), np.asarray(from_orbax.forward(ids, PIXELS)),
                               atol=1e-5, rtol=0)


def test_unknown_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint: expected a Hugging Face folder"):
        nvlm_jax.load_pretrained(tmp_path)


def test_choose_mesh_puts_as_many_devices_on_tensor_as_the_heads_allow(release):
    cfg = nvlm_jax.pretrained.read_config(hc.tiny_converted())
    mesh = nvlm_jax.pretrained.choose_mesh(cfg, 8)  # 2 KV heads: tensor 2, fsdp 4
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert nvlm_jax.pretrained.read_config(release.folder).llm == cfg.llm


@pytest.mark.parametrize("arch", ["X", "H"])
def test_prepare_chat_cross_ids_equal_the_training_pipeline(arch, tmp_path):
    from nvlm_jax.data import transforms
    from nvlm_jax.data.pipeline import config_for_tokenizer
    from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

    tok = load_tokenizer(make_tiny_tokenizer(tmp_path))
    cfg = config_for_tokenizer(nvlm_jax.config.tiny(arch), tok)
    model = nvlm_jax.NVLMModel(cfg, params=None, tokenizer=tok)  # prompts only: no params needed
    pixels = np.zeros((4, 28, 28, 3), np.float32)
    inputs = model.prepare_chat([pixels[:1], pixels[1:]], "Literal <Image></Image> text, then compare.")
    assert inputs.prompt.num_tiles == (1, 3)
    sample = transforms.EncodedSample("s", "r", inputs.prompt, pixels, inputs.prompt.num_tiles)
    example = transforms.MakeTargets(seq_len=4096, pad_id=0).map(sample)
    ids = inputs.cross_ids
    np.testing.assert_array_equal(ids.token_image, example.token_image)
    np.testing.assert_array_equal(ids.token_tile, example.token_tile)
    np.testing.assert_array_equal(ids.tile_image, example.tile_image)
    assert ids.token_image.max() == 1 and set(ids.token_tile[ids.token_tile >= 0]) == {0, 1, 2, 3}


def test_layer_layout_is_per_layer_on_cpu_unless_asked(release, from_orbax):
    assert from_orbax.config.layer_layout == "per_layer"  # "auto": NVLM-D on CPU
    assert "layers" not in from_orbax.params["llm"] and "layer_0" in from_orbax.params["llm"]
    stacked = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32", layer_layout="stacked")
    assert stacked.config.layer_layout == "stacked" and "layers" in stacked.params["llm"]
    ids = hc.prompt_ids(release.cfg, [3, 1], seed=4)
    np.testing.assert_array_equal(
        stacked.generate(ids[None], PIXELS, max_new_tokens=16, stop_token_ids=()),
        from_orbax.generate(ids[None], PIXELS, max_new_tokens=16, stop_token_ids=()))
    with pytest.raises(ValueError, match="layer_layout must be 'auto', 'stacked' or 'per_layer', got 'flat'"):
        nvlm_jax.load_pretrained(hc.tiny_converted(), layer_layout="flat")
