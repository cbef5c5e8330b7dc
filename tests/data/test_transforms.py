"""Tests for nvlm_jax.data.transforms: each named transform, its skip reasons, and the target layout."""

import numpy as np
import pytest
from PIL import Image

from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import get_special_tokens, load_tokenizer, make_tiny_tokenizer
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.processing.tokenizer import decode


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def special(tok):
    return get_special_tokens(tok)


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return tuple(out)


def _sample(conversation, images=()):
    return tr.RawSample("src", "file:1", tuple(conversation), tuple(images))


def _example(tok, special, conversation, images=(), *, arch="D", tag_style="1d", seq_len=512, tiles=16):
    element = _sample(conversation, images)
    chain = [
        tr.ValidateConversation(),
        tr.LoadImages(),
        tr.TileImages(28, 6, True, tiles),
        tr.EncodeConversation(tok, arch=arch, fmt=PromptFormat(tag_style=tag_style, tokens_per_tile=4)),
        tr.MakeTargets(seq_len=seq_len, pad_id=special.endoftext),
    ]
    for t in chain:
        element = t.map(element)
    return element


def _img(w=28, h=28, colour=(0, 0, 255)):
    return Image.new("RGB", (w, h), colour)


# ------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "conversation, images, reason",
    [
        ((), (), tr.EMPTY_CONVERSATION),
        (({"from": "robot", "value": "x"},), (), tr.MALFORMED_RECORD),
        (({"from": "human", "value": 3}, {"from": "gpt", "value": "x"}), (), tr.MALFORMED_RECORD),
        (({"from": "human", "value": "hi"},), (), tr.ANSWER_LESS_TURN),
        (_turns(("hi", "  ")), (), tr.ANSWER_LESS_TURN),
        (_turns(("hi", "yo")) + ({"from": "human", "value": "and?"},), (), tr.ANSWER_LESS_TURN),
        (_turns(("<image><image> two?", "yes")), ("a.png",), tr.IMAGE_PLACEHOLDER_MISMATCH),
    ],
)
def test_validate_conversation_skips_with_a_reason(conversation, images, reason):
    out = tr.ValidateConversation().map(_sample(conversation, images))
    assert isinstance(out, tr.Skipped) and out.reason == reason
    assert (out.source, out.record) == ("src", "file:1")


def test_validate_conversation_keeps_good_samples_and_passes_skips_through():
    good = _sample(_turns(("<image>\nWhat?", "red")), ("a.png",))
    assert tr.ValidateConversation().map(good) is good
    no_placeholder = _sample(_turns(("What?", "red")), ("a.png",))
    assert tr.ValidateConversation().map(no_placeholder) is no_placeholder  # prepended later
    skip = tr.Skipped("s", "r", tr.TOO_LONG)
    for t in (tr.ValidateConversation(), tr.LoadImages(), tr.TileImages(28, 6, True, 4)):
        assert t.map(skip) is skip


# ------------------------------------------------------------------------------------------
# Images.


def test_load_images_reports_missing_and_corrupt_images(tmp_path):
    missing = tr.LoadImages().map(_sample(_turns(("<image>", "a")), (str(tmp_path / "gone.png"),)))
    assert missing.reason == tr.MISSING_IMAGE and "gone.png" in missing.detail
    corrupt = tr.LoadImages().map(_sample(_turns(("<image>", "a")), (b"\x89PNG\r\n\x1a\n garbage",)))
    assert corrupt.reason == tr.CORRUPT_IMAGE and "file:1 image 0" in corrupt.detail
    truncated_path = tmp_path / "t.png"
    _img(64, 64).save(truncated_path)
    truncated_path.write_bytes(truncated_path.read_bytes()[:60])
    truncated = tr.LoadImages().map(_sample(_turns(("<image>", "a")), (str(truncated_path),)))
    assert truncated.reason == tr.CORRUPT_IMAGE
    big = tr.LoadImages(max_pixels=100).map(_sample(_turns(("<image>", "a")), (_img(),)))
    assert big.reason == tr.CORRUPT_IMAGE and "max_pixels" in big.detail


def test_load_images_accepts_paths_bytes_pil_and_arrays(tmp_path):
    path = tmp_path / "a.png"
    _img(30, 20).save(path)
    refs = (str(path), path.read_bytes(), _img(30, 20).convert("L"), np.zeros((20, 30, 3), np.uint8))
    out = tr.LoadImages().map(_sample(_turns(("<image>" * 4, "a")), refs))
    assert [im.size for im in out.images] == [(30, 20)] * 4
    assert all(im.mode == "RGB" for im in out.images)


def test_tile_images_skips_when_the_tiles_exceed_the_row_bucket():
    wide = tr.LoadImages().map(_sample(_turns(("<image>", "a")), (_img(112, 28),)))  # 4x1 grid + thumbnail
    skipped = tr.TileImages(28, 6, True, tiles_per_row=4).map(wide)
    assert skipped.reason == tr.TOO_MANY_TILES and "5 tiles" in skipped.detail
    tiled = tr.TileImages(28, 6, True, tiles_per_row=5).map(wide)
    assert tiled.pixels.shape == (5, 28, 28, 3) and tiled.pixels.dtype == np.uint8
    assert tiled.num_tiles == (5,) and tiled.grids == ((4, 1),)
    text = tr.TileImages(28, 6, True, 5).map(_sample(_turns(("hi", "yo"))))
    assert text.pixels.shape == (0, 28, 28, 3) and text.num_tiles == ()


# ------------------------------------------------------------------------------------------
# Tokens and targets.


def test_targets_are_next_tokens_and_loss_covers_only_answers(tok, special):
    ex = _example(tok, special, _turns(("<image>\nWhat colour is the shape?", "red")), (_img(),))
    assert isinstance(ex, tr.Example)
    np.testing.assert_array_equal(ex.targets[:-1], ex.input_ids[1:])
    assert ex.targets[-1] == special.endoftext and not ex.loss_mask[-1]
    assert decode(tok, ex.targets[ex.loss_mask]) == "red<|im_end|>"
    assert ex.pixels.shape == (1, 28, 28, 3) and ex.tile_image.tolist() == [0]


def test_token_tile_marks_tag_tokens_only_and_token_image_starts_at_the_image_block(tok, special):
    ex = _example(tok, special, _turns(("<image>\nRead it.", "cat")), (_img(84, 28),))  # 3 tiles + thumbnail
    ids = ex.input_ids
    assert not (ex.token_tile[ids == special.vision_pad] >= 0).any()
    for k, tag in enumerate(["<tile_1>", "<tile_2>", "<tile_3>", "<tile_global_thumbnail>"]):
        toks = np.flatnonzero(ex.token_tile == k)
        assert toks.size and tag.strip("<>") in decode(tok, ids[toks[0] : toks[-1] + 1])
    first = int(np.flatnonzero(ex.token_image == 0)[0])
    assert decode(tok, ids[first : first + 1]).startswith("<Image")
    assert (ex.token_image[:first] == -1).all() and (ex.token_image[first:] == 0).all()


def test_user_text_holding_image_markup_does_not_move_the_image_start(tok, special):
    question = "The <Image> tag and <tile_1> are text here. <image>\nWhat is it?"
    for arch in ("D", "X", "H"):
        ex = _example(tok, special, _turns((question, "cat")), (_img(56, 28),), arch=arch)
        first = int(np.flatnonzero(ex.token_image == 0)[0])
        tail = decode(tok, ex.input_ids[first:])
        head = decode(tok, ex.input_ids[:first])
        # The start token holds the "<" of the real "<Image>" (here merged with the space before it).
        assert head.endswith("are text here.") and tail.lstrip().startswith("<Image><tile_1>"), arch
        assert (ex.token_tile[:first] == -1).all()  # the user's "<tile_1>" text names no tile


def test_two_images_get_increasing_indices_in_every_arch(tok, special):
    conv = _turns(("<image> and <image>: same?", "no"), ("Sure?", "yes"))
    for arch in ("D", "X", "H"):
        ex = _example(tok, special, conv, (_img(), _img(56, 28)), arch=arch)
        assert ex.tile_image.tolist() == [0, 1, 1, 1]
        starts = [int(np.flatnonzero(ex.token_image == i)[0]) for i in (0, 1)]
        for s in starts:
            assert decode(tok, ex.input_ids[s:]).lstrip().startswith("<Image>")
            assert "<" in decode(tok, ex.input_ids[s : s + 1])
        assert sorted(set(ex.token_tile.tolist()) - {-1}) == [0, 1, 2, 3]
        assert decode(tok, ex.targets[ex.loss_mask]) == "no<|im_end|>yes<|im_end|>"


def test_cross_attention_arch_without_tags_is_not_confused_by_typed_image_markup(tok, special):
    conv = _turns(("<image>\nWhat?", "red"))
    ex = _example(tok, special, conv, (_img(),), arch="X", tag_style="none")
    assert not (ex.input_ids == special.vision_pad).any() and (ex.token_tile == -1).all()
    first = int(np.flatnonzero(ex.token_image == 0)[0])
    assert decode(tok, ex.input_ids[first:]).startswith("<Image></Image>")
    # The user types the very text NVLM-X writes for an untagged image: it stays text.
    tricky = _turns(("Is <Image></Image> empty? <image>", "yes"))
    ex = _example(tok, special, tricky, (_img(),), arch="X", tag_style="none")
    assert isinstance(ex, tr.Example)
    rendered = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                "Is <Image></Image> empty? <Image></Image><|im_end|><|im_start|>assistant\nyes<|im_end|>")
    assert ex.input_ids.tolist() == tok(rendered, add_special_tokens=False).input_ids
    first = int(np.flatnonzero(ex.token_image == 0)[0])
    assert decode(tok, ex.input_ids[:first]).endswith("Is <Image></Image> empty?")
    assert decode(tok, ex.input_ids[first:]).lstrip().startswith("<Image></Image><|im_end|>")
    assert (ex.token_image[:first] == -1).all() and (ex.token_image[first:] == 0).all()
    assert decode(tok, ex.targets[ex.loss_mask]) == "yes<|im_end|>"


def test_too_long_samples_are_skipped(tok, special):
    ex = _example(tok, special, _turns(("<image>\nWhat?", "red")), (_img(),), seq_len=20)
    assert ex.reason == tr.TOO_LONG and "> seq_len 20" in ex.detail


def test_prompt_builder_refusals_are_bad_conversations(tok, special):
    conv = ({"from": "human", "value": "hi"}, {"from": "system", "value": "late"}, {"from": "gpt", "value": "x"})
    out = _example(tok, special, conv)
    assert out.reason == tr.BAD_CONVERSATION and "system turn must come first" in out.detail

