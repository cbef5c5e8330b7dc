"""Saving a loaded model as a converted folder: params, layout, quantization, prompt format and
tokenizer come back as they were."""

import jax
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax.checkpoint.save_model import save_model
from nvlm_jax.processing.prompt_format import PromptFormat
from tests import hf_checkpoint as hc
from tests.checkpoint.workdir import tiny_model, write_workdir

PIXELS = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)


def _leaves(params):
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("quantize,layout", [(None, "per_layer"), ("int4", "stacked")])
def test_a_saved_model_loads_back_equal(tmp_path, quantize, layout):
    model = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32", quantize=quantize, layer_layout=layout)
    out = save_model(model, tmp_path / "saved")
    assert (out / "nvlm_manifest.json").is_file() and (out / "tokenizer.json").is_file()
    back = nvlm_jax.load_pretrained(out, dtype=None, layer_layout=layout, verify=True)
    assert back.config == model.config and back.prompt_format == model.prompt_format
    got, want = _leaves(back.params), _leaves(model.params)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    ids = hc.prompt_ids(model.config, [1])[None]
    np.testing.assert_array_equal(np.asarray(back.forward(ids, PIXELS)), np.asarray(model.forward(ids, PIXELS)))
    with pytest.raises(ValueError, match="already exists"):
        save_model(model, out)
    save_model(model, out, overwrite=True)


def test_a_training_run_saves_with_the_built_in_tokenizer_and_its_prompt_format(tmp_path):
    cfg, params, _ = tiny_model()
    fmt = PromptFormat.for_model(cfg, tag_style="2d_grid", max_tiles=3)
    write_workdir(tmp_path / "run", cfg, params, [(1, None)], prompt_format=fmt)
    model = nvlm_jax.load_pretrained(tmp_path / "run", dtype="float32")
    back = nvlm_jax.load_pretrained(save_model(model, tmp_path / "saved"), dtype="float32")
    assert back.prompt_format == fmt
    text = "What colour is the shape?"
    ids = [getattr(r, "ids", r) for r in (back.tokenizer.encode(text), model.tokenizer.encode(text))]
    assert list(ids[0]) == list(ids[1]) and len(ids[0]) > 3
