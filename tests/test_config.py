"""Config presets, the HF config reader, and analytic parameter counts."""

import dataclasses
import json
import os

import jax
import pytest

from nvlm_jax import config as C
from nvlm_jax.models import nvlm

REFERENCE_DIR = os.environ.get(
    "NVLM_REFERENCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
)
REF_CONFIG = os.path.join(REFERENCE_DIR, "nvlm_d_72b_config.json")
needs_reference = pytest.mark.skipif(
    not os.path.exists(REF_CONFIG), reason=f"release config not found at {REF_CONFIG} (set NVLM_REFERENCE_DIR)"
)


@needs_reference
def test_from_hf_reads_the_release_config_into_the_72b_preset():
    assert C.NVLMConfig.from_hf(REF_CONFIG) == C.nvlm_d_72b()


@needs_reference
def test_from_hf_accepts_a_folder_and_a_dict(tmp_path):
    with open(REF_CONFIG) as f:
        d = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert C.NVLMConfig.from_hf(tmp_path) == C.NVLMConfig.from_hf(d)


def test_72b_parameter_counts_match_the_release_index():
    cfg = C.nvlm_d_72b()
    assert C.param_count(cfg) == 79_379_593_344
    no_dummy = cfg.replace(vision=dataclasses.replace(cfg.vision, num_dummy_heads=0))
    assert C.param_count(no_dummy) == 78_863_416_704
    assert C.llm_param_count(cfg.llm) == 72_706_203_648
    assert C.projector_param_count(cfg.projector) == 620_717_056


@pytest.mark.parametrize("make", [lambda: C.tiny("D"), C.nvlm_d_34b,
                                  lambda: C.tiny("D", vision=dataclasses.replace(
                                      C.tiny("D").vision, norm_type="layer_norm", num_dummy_heads=2))])
def test_param_count_equals_the_real_tree(make):
    cfg = make()
    shapes = jax.tree_util.tree_leaves(nvlm.abstract_params(cfg))
    assert C.param_count(cfg) == sum(x.size for x in shapes)


def test_34b_preset_is_llama_without_qkv_bias():
    cfg = C.nvlm_d_34b()
    assert cfg.llm.family == "llama" and not cfg.llm.qkv_bias
    assert cfg.projector.hidden_size == 20480 and cfg.projector.output_size == 7168
    assert cfg.image_context_token_id < cfg.llm.vocab_size


def test_tiny_presets_for_every_arch():
    assert C.tiny("D").num_image_tokens == 4
    assert C.tiny("X").projector.num_layers == 1 and C.tiny("X").xattn_every
    assert C.tiny("H").projector.num_layers == 2


def test_dict_round_trip():
    cfg = C.nvlm_d_72b()
    assert C.NVLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(model_type="LLaVA", architectures=["Llava"]), "unknown architecture"),
    (dict(llm_config={"architectures": ["GPT2LMHeadModel"]}), "unsupported llm architecture"),
])
def test_from_hf_rejects_unknown_architectures(change, message):
    base = {"model_type": "NVLM_D", "architectures": ["NVLM_D"], "vision_config": {}, "llm_config": {}}
    with pytest.raises(ValueError, match=message):
        C.NVLMConfig.from_hf({**base, **change})


def test_from_hf_names_missing_keys():
    d = {"model_type": "NVLM_D", "vision_config": {"hidden_size": 8},
         "llm_config": {"architectures": ["Qwen2ForCausalLM"]}}
    with pytest.raises(ValueError, match="missing key 'hidden_size'"):
        C.NVLMConfig.from_hf(d)


def test_from_hf_unreadable_file_names_the_path(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        C.NVLMConfig.from_hf(bad)


def test_inconsistent_configs_are_rejected():
    with pytest.raises(ValueError, match="projector input_size"):
        C.tiny("D").replace(projector=C.ProjectorConfig(input_size=7, hidden_size=8, output_size=64))
    with pytest.raises(ValueError, match="arch must be"):
        C.tiny("Q")
    with pytest.raises(ValueError, match="select_layer"):
        C.VisionConfig(num_layers=4, select_layer=-5)


def test_xh_presets_have_ten_blocks_and_hand_computed_counts():
    d72 = 79_379_593_344
    mlp1_72 = 620_717_056
    # One block: 2 RMSNorms + q/o (8192x8192 each) + k/v (8192x1024 each) + SwiGLU (3x8192x29568) + 2 gates.
    block72 = 2 * 8192 + 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568 + 2
    x72, h72 = C.nvlm_x_72b(), C.nvlm_h_72b()
    assert x72.llm.num_layers // x72.xattn_every == 10 and h72.llm.num_layers // h72.xattn_every == 10
    assert C.param_count(x72) == d72 - mlp1_72 + 12800 * 8192 + 10 * block72 == 87_640_478_868
    assert C.param_count(h72) == d72 + 10 * block72
    d34 = C.param_count(C.nvlm_d_34b())
    mlp1_34 = 2 * 12800 + 12800 * 20480 + 20480 * 7168
    block34 = 2 * 7168 + 2 * 7168 * 7168 + 2 * 7168 * 1024 + 3 * 7168 * 20480 + 2
    x34, h34 = C.nvlm_x_34b(), C.nvlm_h_34b()
    assert x34.llm.num_layers // x34.xattn_every == 10
    assert C.param_count(x34) == d34 - mlp1_34 + 12800 * 7168 + 10 * block34
    assert C.param_count(h34) == d34 + 10 * block34


def _release():
    """The release's config.json, or (where the reference folder is absent) the same preset as we export it."""
    if os.path.exists(REF_CONFIG):
        with open(REF_CONFIG) as f:
            return json.load(f)
    from nvlm_jax.checkpoint.export import to_hf_config
    return to_hf_config(C.nvlm_d_72b())


@pytest.mark.parametrize("where, key, value, message", [
    ("llm_config", "hidden_size", "64", r"llm.hidden_size must be an integer, got str '64'"),
    ("llm_config", "rope_theta", -1.0, r"llm.rope_theta must be > 0, got -1.0"),
    ("llm_config", "rms_norm_eps", -1e-6, r"llm.rms_norm_eps must be > 0"),
    ("llm_config", "rms_norm_eps", "1e-6", r"llm.rms_norm_eps must be a finite number, got str"),
    ("llm_config", "vocab_size", True, r"llm.vocab_size must be an integer, got bool"),
    ("llm_config", "num_hidden_layers", 0, r"llm.num_layers must be > 0"),
    ("vision_config", "hidden_size", 3200.5, r"vision.hidden_size must be an integer, got float"),
    ("vision_config", "layer_norm_eps", float("nan"), r"vision.norm_eps must be a finite number"),
    (None, "max_dynamic_patch", 0, r"config.max_tiles must be > 0"),
    (None, "use_thumbnail", "yes", None),  # bool() of the release's flag: any JSON truthy value is accepted
    (None, "llm_config", [1], r"llm_config must be a JSON object, got list"),
])
def test_from_hf_names_bad_value_types_and_ranges(tmp_path, where, key, value, message):
    d = _release()
    (d[where] if where else d)[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    if message is None:
        C.NVLMConfig.from_hf(path)
        return
    with pytest.raises(ValueError, match=message) as e:
        C.NVLMConfig.from_hf(path)
    assert str(e.value).startswith(str(path))


def test_direct_configs_are_checked_too():
    with pytest.raises(ValueError, match="vision.patch_size must be > 0"):
        C.VisionConfig(patch_size=0)
    with pytest.raises(ValueError, match="projector num_layers must be 1 or 2"):
        C.ProjectorConfig(num_layers=3)
    with pytest.raises(ValueError, match="config.image_context_token_id must be >= 0"):
        C.tiny("D").replace(image_context_token_id=-1)
