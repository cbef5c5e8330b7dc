"""Assembly of a standalone InternViT and LLM into a fresh NVLM checkpoint."""

import numpy as np
import pytest

from nvlm_jax.checkpoint import assemble as assemble_lib
from nvlm_jax.checkpoint import restore
from tests import hf_checkpoint as hc
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


# ---- assembly of standalone checkpoints ---------------------------------------------------------


def test_assemble_standalone_internvit_and_llm(release, tmp_path):
    model = release.torch_model
    vit = hc.write_standalone(tmp_path / "vit", hc.standalone_vit_state(model), hc.standalone_vit_config(release.cfg))
    llm_dir = tmp_path / "llm"
    model.language_model.save_pretrained(llm_dir, safe_serialization=True)
    hc.make_tiny_tokenizer(llm_dir)
    out = assemble_lib.assemble(vit, llm_dir, tmp_path / "nvlm", dtype="float32", seed=1, vit_dummy_heads=2,
                           progress=False)
    cfg = restore.read_our_config(out)
    assert cfg.vision.num_dummy_heads == 2
    assert cfg.image_context_token_id == hc.tiny_special_ids()["vision_pad"]
    assert cfg.replace(vision=release.cfg.vision) == release.cfg.replace(dtype="float32", param_dtype="float32")
    params = restore.load_our_params(out, cfg)
    got, want = hc.strip_dummy_heads(params, real=2), hc.flat_params(ref.jax_params_for(model))
    for name in want:
        if name.startswith("projector/"):
            assert got[name].shape == want[name].shape and np.all(np.isfinite(got[name]))
            assert not np.array_equal(got[name], want[name]) or name.startswith("projector/norm")
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    again = assemble_lib.assemble(vit, llm_dir, tmp_path / "nvlm2", dtype="float32", seed=1, progress=False)
    p2 = restore.load_our_params(again, restore.read_our_config(again))
    np.testing.assert_array_equal(p2["projector"]["fc1"]["kernel"], params["projector"]["fc1"]["kernel"])


def test_assemble_initialises_cross_attention_for_nvlm_h(release, tmp_path):
    model = release.torch_model
    vit = hc.write_standalone(tmp_path / "vit", hc.standalone_vit_state(model), hc.standalone_vit_config(release.cfg))
    llm_dir = tmp_path / "llm"
    model.language_model.save_pretrained(llm_dir, safe_serialization=True)
    out = assemble_lib.assemble(vit, llm_dir, tmp_path / "h", arch="H", dtype="float32",
                           image_context_token_id=hc.tiny_special_ids()["vision_pad"], progress=False)
    cfg = restore.read_our_config(out)
    assert cfg.arch == "H" and cfg.xattn_every == 1  # 2 layers // 10 blocks, at least 1
    params = restore.load_our_params(out, cfg)
    assert sorted(params) == ["llm", "projector", "vision", "xattn"]
    assert not np.any(np.asarray(params["xattn"]["attn_gate"]))  # untrained blocks are the identity
    expected = hc.flat_params(ref.jax_params_for(model))["llm/embed_tokens"]
    np.testing.assert_array_equal(params["llm"]["embed_tokens"], expected)


def test_assemble_refuses_swapped_inputs(release, tmp_path):
    vit = hc.write_standalone(tmp_path / "vit", hc.standalone_vit_state(release.torch_model),
                              hc.standalone_vit_config(release.cfg))
    with pytest.raises(ValueError, match="expected a standalone llm checkpoint"):
        assemble_lib.assemble(vit, vit, tmp_path / "x", image_context_token_id=5, progress=False)


