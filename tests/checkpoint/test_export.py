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


def test_exporting_non_zero_heads_away_is_refused(release, tmp_path):
    cfg, params = hf_import.load_hf_params(release.folder, "float32")  # 2 real + 2 dummy heads
    qkv = np.array(params["vision"]["layers"]["attn"]["qkv"]["kernel"])
    qkv[1, :, 0, 3] = 0.5  # a dummy head that is no longer zero
    params["vision"]["layers"]["attn"]["qkv"]["kernel"] = qkv
    with pytest.raises(ValueError, match="vision/layers/attn/qkv/kernel: heads 2.. are not zero"):
        export.export_hf(params, cfg, tmp_path / "x", vit_dummy_heads=0)
    assert not (tmp_path / "x").exists()


