"""Export: bit-exact round trips, shard sizes, dummy heads, and the prompt format in config.json."""

import json

import numpy as np
import pytest

from nvlm_jax import weight_map as wm
from nvlm_jax.checkpoint import export, folders, hf_import, plan, restore
from nvlm_jax.config import NVLMConfig
from nvlm_jax.safetensors_io import SafetensorsFile
from tests import hf_checkpoint as hc
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


# ---- export -------------------------------------------------------------------------------------


def _tensors(folder):
    index = json.loads((folder / folders.INDEX_FILE).read_text())["weight_map"]
    return {k: SafetensorsFile(folder / name).read(k) for k, name in index.items()}


@pytest.mark.parametrize("drop", [False, True])
def test_convert_then_export_is_bit_exact(tmp_path, drop):
    model = ref.TorchNVLMD(hc.tiny_cfg(), seed=5)
    source = hc.write_release(tmp_path / "hf", model, dummy_heads=2, fp32_pattern=None)  # all bf16
    ours = hf_import.convert(source, tmp_path / "ours", dtype="bfloat16", drop_dummy_heads=drop, progress=False)
    back = export.export_checkpoint(ours, tmp_path / "back", vit_dummy_heads=2 if drop else None)
    want, got = _tensors(source), _tensors(back)
    assert list(got) == [s.key for s in wm.layout_slots("nvlm", plan.abstract_shapes(restore.read_our_config(ours)))]
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k
    cfg_back = NVLMConfig.from_hf(back / "config.json")
    cfg_src = NVLMConfig.from_hf(source / "config.json")
    assert cfg_back.replace(image_context_token_id=0) == cfg_src.replace(image_context_token_id=0)
    assert (back / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_export_shards_by_size_and_round_trips_our_params(release, tmp_path):
    out = hc.tiny_converted()
    cfg = restore.read_our_config(out)
    params = restore.load_our_params(out, cfg)
    hf = export.export_hf(params, cfg, tmp_path / "hf", max_shard_bytes=40_000, tokenizer_dir=out)
    index = json.loads((hf / folders.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(hf).values())
    cfg2, params2 = hf_import.load_hf_params(hf, "float32")
    assert cfg2 == cfg
    a, b = hc.flat_params(params), hc.flat_params(params2)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_dummy_heads_are_inert_and_exported_as_zero_heads(release, tmp_path):
    import jax

    from nvlm_jax.pretrained import NVLMModel

    cfg, params = hf_import.load_hf_params(release.folder, "float32")  # 2 real + 2 dummy heads
    pixels = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    ids = hc.prompt_ids(cfg, [1])[None]
    want = np.asarray(NVLMModel(cfg, params).forward(ids, pixels))
    moved = jax.tree_util.tree_map(np.array, params)
    attn = moved["vision"]["layers"]["attn"]
    attn["qkv"]["kernel"][1, :, :, 3] = 0.5  # dummy heads no longer zero (e.g. merged adapters)
    attn["proj"]["kernel"][1, 3] = 0.5
    np.testing.assert_array_equal(np.asarray(NVLMModel(cfg, moved).forward(ids, pixels)), want)
    out = export.export_hf(moved, cfg, tmp_path / "x", vit_dummy_heads=0)
    qkv = _tensors(out)["vision_model.encoder.layers.1.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * 2 * cfg.vision.head_dim  # real heads only
    np.testing.assert_array_equal(qkv, _tensors(release.folder)["vision_model.encoder.layers.1.attn.qkv.weight"]
                                  .reshape(3, 4, -1, qkv.shape[1])[:, :2].reshape(qkv.shape).astype(qkv.dtype))


# ---- LoRA models and the release's auto_map ----------------------------------------------------------


def test_lora_model_exports_merged_and_the_release_model_reads_it(tmp_path):
    import jax

    from nvlm_jax.config import LoraConfig
    from nvlm_jax.models import lora
    from nvlm_jax.pretrained import NVLMModel

    source = hc.tiny_converted()
    cfg = restore.read_our_config(source)
    cfg = cfg.replace(lora=LoraConfig(rank=4, alpha=8.0, targets=("llm", "vision", "projector")))
    params = lora.with_adapters(restore.load_our_params(source, cfg.replace(lora=LoraConfig())),
                                lora.init_adapters(cfg, jax.random.key(0)))
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree_util.tree_map_with_path(  # trained-looking adapters: B no longer zero
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x,
        lora.adapters(params))
    params = lora.with_adapters(lora.without_adapters(params), adapters)
    pixels = np.random.default_rng(1).standard_normal((4, 28, 28, 3)).astype(np.float32)
    ids = hc.prompt_ids(cfg, [3, 1])[None]
    adapted = np.asarray(NVLMModel(cfg, params).forward(ids, pixels))

    with pytest.raises(ValueError, match="LoRA adapters"):
        export.export_hf(params, cfg, tmp_path / "refused")
    merged, merged_cfg = lora.merge(params, cfg)
    out = export.export_hf(merged, merged_cfg, tmp_path / "hf", tokenizer_dir=source)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "nvidia/NVLM-D-72B--configuration_nvlm_d.NVLM_D_Config",
        "AutoModel": "nvidia/NVLM-D-72B--modeling_nvlm_d.NVLM_D_Model",
        "AutoModelForCausalLM": "nvidia/NVLM-D-72B--modeling_nvlm_d.NVLM_D_Model",
    }
    assert "lora" not in json.dumps(config)
    # transformers' Qwen2 + InternViT modules, loaded strictly
    torch_model = hc.torch_from_release(out, cfg.image_context_token_id)
    np.testing.assert_allclose(torch_model(ids, pixels), adapted, atol=2e-4, rtol=0)


def test_the_72b_vit_gets_its_dummy_heads_back_and_auto_map_can_point_beside_the_weights():
    cfg = NVLMConfig()  # the 72B layout
    assert export.release_dummy_heads(cfg.replace(vision=cfg.vision.__class__(num_dummy_heads=0))) == 7
    assert export.release_dummy_heads(cfg.replace(vision=cfg.vision.__class__(num_dummy_heads=7))) is None
    assert export.release_dummy_heads(hc.tiny_cfg()) is None
    assert export.release_auto_map("")["AutoModel"] == "modeling_nvlm_d.NVLM_D_Model"
