"""Tests for nvlm_jax.processing.chat_template: the rendered prompt strings, image expansion, tile tags."""

import pytest

from nvlm_jax.processing.chat_template import (
    build_prompt,
    expand_image_placeholders,
    image_token_count,
    tile_tags,
)

PAD = "<|vision_pad|>"
SYS = "<|im_start|>system\nAnswer the questions.<|im_end|>"


def test_single_image_prompt_matches_the_release_string():
    text = build_prompt("<image>\nPlease describe the image shortly.", [3])
    image = (
        "<Image><tile_1>" + PAD * 256 + "<tile_2>" + PAD * 256
        + "<tile_global_thumbnail>" + PAD * 256 + "</Image>"
    )  # fmt: skip
    assert text == (
        SYS + "<|im_start|>user\n" + image + "\nPlease describe the image shortly.<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_text_only_prompt_has_no_image_tokens_and_no_newline_after_im_end():
    text = build_prompt("Hi")
    assert text == SYS + "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    assert "<|im_end|>\n" not in text


def test_question_without_placeholder_gets_one_image_prepended_per_image():
    assert build_prompt("Hi", [1], tokens_per_tile=1) == build_prompt(
        "<image>\nHi", [1], tokens_per_tile=1
    )
    assert build_prompt("Hi", [1, 1], tokens_per_tile=1) == build_prompt(
        "<image>\n<image>\nHi", [1, 1], tokens_per_tile=1
    )


def test_multi_turn_history_is_rendered_in_order():
    text = build_prompt("Q2", history=[("Q0", "A0"), ("Q1", "A1")], system_message=None)
    assert text == (
        "<|im_start|>user\nQ0<|im_end|><|im_start|>assistant\nA0<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )


def test_system_message_is_overridable():
    assert build_prompt("Hi", system_message="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"
    )


def test_images_in_history_are_expanded_before_the_question_images():
    text = build_prompt(
        "<image>\nAnd this?", [1, 2], history=[("<image>\nWhat?", "A cat.")], tokens_per_tile=1
    )
    first, second = text.split("<Image>")[1:]
    assert first.startswith("<tile_global_thumbnail>" + PAD + "</Image>\nWhat?")
    assert second.startswith("<tile_1>" + PAD + "<tile_global_thumbnail>" + PAD + "</Image>")


def test_history_without_placeholder_and_images_raises():
    with pytest.raises(ValueError, match=r"0 image slot\(s\) but 1 image"):
        build_prompt("Hi", [3], history=[("Q", "A")])


@pytest.mark.parametrize(
    "question, num_tiles", [("<image><image> compare", [3]), ("<image> this", [3, 1])]
)
def test_image_slot_count_must_equal_image_count(question, num_tiles):
    with pytest.raises(ValueError, match="image"):
        build_prompt(question, num_tiles)


def test_multiple_images_expand_in_order():
    text = expand_image_placeholders("A <image> B <image>", [3, 1], tokens_per_tile=1)
    assert text == (
        "A <Image><tile_1>" + PAD + "<tile_2>" + PAD + "<tile_global_thumbnail>" + PAD
        + "</Image> B <Image><tile_global_thumbnail>" + PAD + "</Image>"
    )  # fmt: skip


def test_single_tile_image_has_only_the_thumbnail_tag():
    assert expand_image_placeholders("<image>", [1], tokens_per_tile=2) == (
        "<Image><tile_global_thumbnail>" + PAD * 2 + "</Image>"
    )


def test_nvlm_x_has_tags_but_no_image_tokens():
    assert expand_image_placeholders("<image>", [3], arch="X") == (
        "<Image><tile_1><tile_2><tile_global_thumbnail></Image>"
    )


def test_nvlm_h_has_image_tokens_only_for_the_thumbnail():
    assert expand_image_placeholders("<image>", [3], arch="H", tokens_per_tile=2) == (
        "<Image><tile_1><tile_2><tile_global_thumbnail>" + PAD * 2 + "</Image>"
    )


def test_tag_style_none_has_no_tags():
    assert expand_image_placeholders("<image>", [3], tag_style="none", tokens_per_tile=1) == (
        "<Image>" + PAD * 3 + "</Image>"
    )


def test_2d_grid_tags_are_one_based_column_row():
    tags = tile_tags(7, (3, 2), tag_style="2d_grid")
    assert tags == (
        "<tile_x1_y1>", "<tile_x2_y1>", "<tile_x3_y1>",
        "<tile_x1_y2>", "<tile_x2_y2>", "<tile_x3_y2>", "<tile_global_thumbnail>",
    )  # fmt: skip


def test_2d_bbox_tags_are_tile_boxes_on_a_0_to_1000_scale():
    tags = tile_tags(7, (3, 2), tag_style="2d_bbox")
    assert tags[:3] == (
        "<box>(0,0),(333,500)</box>",
        "<box>(333,0),(666,500)</box>",
        "<box>(666,0),(1000,500)</box>",
    )
    assert tags[5] == "<box>(666,500),(1000,1000)</box>"
    assert tags[6] == "<tile_global_thumbnail>"


def test_2d_tag_styles_need_grids_and_grids_must_match_tile_counts():
    with pytest.raises(ValueError, match="grid"):
        build_prompt("<image>", [7], tag_style="2d_grid")
    with pytest.raises(ValueError, match=r"image 0: grid \(2, 2\) has 4 tiles"):
        build_prompt("<image>", [7], grids=[(2, 2)])
    with pytest.raises(ValueError, match="2 grids for 1 images"):
        build_prompt("<image>", [7], grids=[(3, 2), (1, 1)])
    text = build_prompt("<image>", [7], grids=[(3, 2)], tag_style="2d_grid", tokens_per_tile=1)
    assert "<tile_x3_y2>" + PAD + "<tile_global_thumbnail>" in text


def test_use_thumbnail_false_tags_every_tile_as_a_grid_tile():
    assert tile_tags(4, (2, 2), use_thumbnail=False) == (
        "<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>"
    )  # fmt: skip


@pytest.mark.parametrize("arch, expected", [("D", 10), ("X", 0), ("H", 4)])
def test_image_token_count_matches_the_rendered_pads(arch, expected):
    assert image_token_count([3, 2], arch=arch, tokens_per_tile=2) == expected
    assert (
        build_prompt("<image><image>", [3, 2], arch=arch, tokens_per_tile=2).count(PAD) == expected
    )


@pytest.mark.parametrize("kwargs", [{"arch": "Y"}, {"tag_style": "3d"}, {"tokens_per_tile": 0}])
def test_bad_format_options_raise(kwargs):
    with pytest.raises(ValueError):
        build_prompt("<image>", [1], **kwargs)
