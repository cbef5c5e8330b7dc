import pytest

from nvlm_jax.config import tiny
from nvlm_jax.processing.prompt_format import DEFAULT_SYSTEM_MESSAGE, PromptFormat


def test_release_values():
    f = PromptFormat.release()
    assert (f.tag_style, f.max_tiles, f.use_thumbnail, f.tokens_per_tile) == ("1d", 6, True, 256)
    assert f.system_message == DEFAULT_SYSTEM_MESSAGE and f.template == "chatml"


def test_round_trips_through_dict():
    f = PromptFormat(tag_style="2d_grid", max_tiles=1, use_thumbnail=False, tokens_per_tile=4, system_message=None)
    assert PromptFormat.from_dict(f.to_dict()) == f


def test_for_model_takes_tile_budget_and_tokens_from_config():
    cfg = tiny("D")
    f = PromptFormat.for_model(cfg, tag_style="none")
    assert (f.max_tiles, f.use_thumbnail, f.tokens_per_tile, f.tag_style) == (
        cfg.max_tiles, cfg.use_thumbnail, cfg.num_image_tokens, "none")


@pytest.mark.parametrize("bad, message", [
    ({"tag_style": "3d"}, "tag_style must be one of"),
    ({"max_tiles": 0}, "max_tiles must be >= 1"),
    ({"max_tiles": "6"}, "max_tiles must be int, got str"),
    ({"max_tiles": True}, "max_tiles must be int, got bool"),
    ({"use_thumbnail": 1}, "use_thumbnail must be bool"),
    ({"template": "llama3"}, "template must be one of"),
    ({"system_message": 3}, "system_message must be str"),
    ({"tiles": 6}, r"unknown prompt format key\(s\) \['tiles'\]"),
])
def test_bad_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        PromptFormat.from_dict(bad, where="ckpt/nvlm_config.json")


def test_from_dict_names_the_file():
    with pytest.raises(ValueError, match="ckpt/nvlm_config.json"):
        PromptFormat.from_dict({"max_tiles": -1}, where="ckpt/nvlm_config.json")
