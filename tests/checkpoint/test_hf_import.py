"""Importing a Hugging Face release folder: params equal the torch weights, casts, streaming, every
problem of a corrupted source listed at once, progress, and the prompt format written with it."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from nvlm_jax.checkpoint import copying, folders, hf_import, restore, writers
from nvlm_jax.safetensors_io import SafetensorsFile
from tests import hf_checkpoint as hc
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


def test_converted_folder_holds_params_config_and_tokenizer(release):
    out = hc.tiny_converted()
    assert sorted(p.name for p in out.iterdir()) == ["nvlm_config.json", "nvlm_manifest.json", "params",
                                                     "tokenizer.json", "tokenizer_config.json"]
    cfg = restore.read_our_config(out)
    want = release.cfg.replace(vision=dataclasses.replace(release.cfg.vision, num_dummy_heads=2),
                               dtype="float32", param_dtype="float32")
    assert cfg == want
    assert not any(p.name.startswith(".ckpt") for p in out.parent.iterdir())  # temp folder renamed away


def test_converted_params_equal_the_torch_weights(release):
    out = hc.tiny_converted()
    cfg = restore.read_our_config(out)
    params = restore.load_our_params(out, cfg)
    assert params["vision"]["layers"]["attn"]["qkv"]["kernel"].shape == (2, 32, 3, 4, 16)  # 2 + 2 dummy heads
    got = hc.strip_dummy_heads(params, real=2)
    want = hc.flat_params(ref.jax_params_for(release.torch_model))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_dropping_dummy_heads_slices_them_exactly(release):
    cfg, params = hf_import.load_hf_params(release.folder, "float32", drop_dummy_heads=True)
    assert cfg.vision.num_dummy_heads == 0 and cfg.vision.total_heads == 2
    want = hc.flat_params(ref.jax_params_for(release.torch_model))
    got = hc.flat_params(params)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_float32_tensors_are_rounded_to_bfloat16_like_torch(tmp_path):
    model = ref.TorchNVLMD(hc.tiny_cfg(), seed=3)  # weights not bf16-representable
    folder = hc.write_release(tmp_path / "hf", model, dummy_heads=0)
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    stored = SafetensorsFile(folder / _shard_of(folder, key))
    assert stored.info(key).dtype == np.float32  # stored in fp32 like the release
    cfg, params = hf_import.load_hf_params(folder, "bfloat16")
    assert cfg.param_dtype == "bfloat16"
    w = model.language_model.model.layers[0].self_attn.q_proj.weight.detach()
    want = w.to(torch.bfloat16).T.reshape(64, 4, 16).contiguous().view(torch.int16).numpy()
    got = np.asarray(params["llm"]["layers"]["q_proj"]["kernel"][0]).view(np.int16)
    np.testing.assert_array_equal(got, want)
    assert params["llm"]["embed_tokens"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_streamed_copies_equal_whole_tensor_copies(release, tmp_path, monkeypatch, dtype):
    """Tiny block/piece sizes push every tensor through the pread-block and chunk-piece paths."""
    _, whole = hf_import.load_hf_params(release.folder, dtype)
    monkeypatch.setattr(copying, "READ_BLOCK_BYTES", 512)
    monkeypatch.setattr(writers, "WRITE_PIECE_BYTES", 1024)
    monkeypatch.setattr(writers, "CHUNK_BYTES", 4096)
    _, blocked = hf_import.load_hf_params(release.folder, dtype)
    out = hf_import.convert(release.folder, tmp_path / "o", dtype=dtype, progress=False)
    restored = restore.load_our_params(out, restore.read_our_config(out))
    a, b, c = hc.flat_params(whole), hc.flat_params(blocked), hc.flat_params(restored)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes() == c[k].tobytes(), k


# ---- corrupted inputs ---------------------------------------------------------------------------


def _shard_of(folder, key):
    return json.loads((folder / folders.INDEX_FILE).read_text())["weight_map"][key]


def _rewrite_shard(folder, name, edit):
    tensors = torch_load_file(str(folder / name))
    edit(tensors)
    torch_save_file(tensors, str(folder / name), metadata={"format": "pt"})


def _rename_key(folder, old, new):
    name = _shard_of(folder, old)
    _rewrite_shard(folder, name, lambda t: t.__setitem__(new, t.pop(old)))
    index = json.loads((folder / folders.INDEX_FILE).read_text())
    index["weight_map"][new] = index["weight_map"].pop(old)
    (folder / folders.INDEX_FILE).write_text(json.dumps(index))


def _truncate(folder):
    path = folder / "model-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _wrong_shape(folder):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(folder, _shard_of(folder, key), lambda t: t.__setitem__(key, torch.zeros(127, 64)))


def _nonzero_dummy(folder):
    key = "vision_model.encoder.layers.1.attn.qkv.weight"

    def edit(t):
        t[key][4 * 16 + 2 * 16 + 5, 3] = 0.25  # K block, head 2 (a dummy head), row 5

    _rewrite_shard(folder, _shard_of(folder, key), edit)


def _unknown_arch(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llava"
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _index_points_to_absent(folder):
    index = json.loads((folder / folders.INDEX_FILE).read_text())
    index["weight_map"]["vision_model.encoder.layers.0.attn.extra.weight"] = "model-00001-of-00003.safetensors"
    (folder / folders.INDEX_FILE).write_text(json.dumps(index))


def _pickled(folder):
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / folders.INDEX_FILE).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")


CORRUPTIONS = {
    "truncated shard": (_truncate, r"model-00002-of-00003\.safetensors: truncated safetensors file"),
    "missing shard": (lambda f: (f / "model-00002-of-00003.safetensors").unlink(),
                      r"shard file model-00002-of-00003\.safetensors is missing \(the index lists \d+ tensors"),
    "renamed key": (lambda f: _rename_key(f, "language_model.model.layers.1.mlp.gate_proj.weight",
                                          "language_model.model.layers.1.mlp.gate.weight"),
                    r"unexpected key 'language_model\.model\.layers\.1\.mlp\.gate\.weight'(.|\n)*"
                    r"missing param llm/layers/mlp/gate_proj/kernel for layers \[1\]"),
    "wrong shape": (_wrong_shape, r"key 'language_model\.model\.layers\.1\.mlp\.up_proj\.weight' \(model-\d+-of-\d+"
                                  r"\.safetensors\): shape \(127, 64\) gives \(64, 127\), expected \(64, 128\)"),
    "non-zero dummy head": (_nonzero_dummy, r"vision_model\.encoder\.layers\.1\.attn\.qkv\.weight.*dummy heads 2\.\.3 "
                                            r"must be exactly zero, found 1 non-zero values \(max \|x\| = 0\.25\)"),
    "unknown architecture": (_unknown_arch, r"config\.json: unknown architecture \(model_type='llava'"),
    "index points to absent tensor": (
        _index_points_to_absent,
        r"the index maps 'vision_model\.encoder\.layers\.0\.attn\.extra\.weight' to "
        r"model-00001-of-00003\.safetensors, which does not hold that tensor",
    ),
    "pickled weights": (_pickled, r"pytorch_model\.bin.*never unpickles(.|\n)*save_pretrained"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_refused_and_nothing_is_written(release, tmp_path, name):
    corrupt, message = CORRUPTIONS[name]
    folder = hc.copy_release(release, tmp_path / "hf")
    corrupt(folder)
    with pytest.raises(ValueError, match=message):
        hf_import.convert(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_every_problem_is_listed_in_one_error(release, tmp_path):
    folder = hc.copy_release(release, tmp_path / "hf")
    _wrong_shape(folder)
    _rename_key(folder, "vision_model.encoder.layers.0.norm1.weight", "vision_model.encoder.layers.0.norm_1.weight")
    _index_points_to_absent(folder)
    with pytest.raises(ValueError) as e:
        hf_import.convert(folder, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert msg.startswith("5 problem(s) converting")  # the bad shape also leaves its layer missing
    for part in ("up_proj.weight' (", "unexpected key 'vision_model.encoder.layers.0.norm_1.weight'",
                 "missing param vision/layers/norm1/scale for layers [0]", "does not hold that tensor"):
        assert part in msg


def test_existing_output_needs_overwrite(release, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        hf_import.convert(release.folder, tmp_path / "out", progress=False)
    out = hf_import.convert(release.folder, tmp_path / "out", overwrite=True, progress=False)
    assert (out / folders.OUR_CONFIG_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_bar_counts_tensors_and_bytes(release, tmp_path, capfd):
    hf_import.convert(release.folder, tmp_path / "out", progress=True)
    err = capfd.readouterr().err
    n = len(json.loads((release.folder / folders.INDEX_FILE).read_text())["weight_map"])
    assert f"{n}/{n} tensors" in err and "convert" in err and "B/s" in err


