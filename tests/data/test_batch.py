"""Tests for nvlm_jax.data.batch: the batch contract checker."""

import numpy as np
import pytest

from nvlm_jax.data.batch import FIELDS, check_batch_semantics, validate_batch


def _batch(b=2, s=8, t=3, tile=4):
    batch = {
        "input_ids": np.zeros((b, s), np.int32),
        "targets": np.zeros((b, s), np.int32),
        "loss_mask": np.zeros((b, s), bool),
        "segment_ids": np.zeros((b, s), np.int32),
        "positions": np.zeros((b, s), np.int32),
        "pixel_values": np.zeros((b, t, tile, tile, 3), np.float32),
        "tile_valid": np.zeros((b, t), bool),
        "tile_image": np.full((b, t), -1, np.int32),
        "token_image": np.full((b, s), -1, np.int32),
        "token_tile": np.full((b, s), -1, np.int32),
    }
    assert set(batch) == set(FIELDS)
    return batch


def test_valid_batch_returns_its_sizes():
    assert validate_batch(_batch(b=2, s=8, t=3)) == (2, 8, 3)


def test_extra_fields_are_allowed():
    batch = _batch()
    batch["extra"] = np.zeros(1)
    assert validate_batch(batch) == (2, 8, 3)


def test_missing_field_is_named():
    batch = _batch()
    del batch["token_tile"]
    with pytest.raises(ValueError, match="token_tile"):
        validate_batch(batch)


@pytest.mark.parametrize(
    "name, value",
    [
        ("loss_mask", np.zeros((2, 8), np.int32)),  # wrong dtype kind
        ("pixel_values", np.zeros((2, 3, 4, 4), np.float32)),  # wrong rank
        ("targets", np.zeros((2, 7), np.int32)),  # wrong length
        ("tile_image", np.zeros((2, 4), np.int32)),  # wrong tile count
    ],
)
def test_wrong_field_is_named(name, value):
    batch = _batch()
    batch[name] = value
    with pytest.raises(ValueError, match=name):
        validate_batch(batch)


def _packed():
    """Two samples (5 and 3 tokens, 2 tiles of image 0 and 1 tile of image 1) in a row of 10."""
    batch = _batch(b=1, s=10, t=4)
    batch["segment_ids"][0] = [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    batch["positions"][0] = [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    batch["loss_mask"][0] = [0, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    batch["tile_valid"][0] = [1, 1, 1, 0]
    batch["tile_image"][0] = [0, 0, 1, -1]
    batch["pixel_values"][0, :3] = 1.0
    batch["token_tile"][0] = [-1, 0, 1, -1, -1, -1, 2, -1, -1, -1]
    batch["token_image"][0] = [-1, 0, 0, 0, 0, -1, 1, 1, -1, -1]
    return batch


def test_semantic_check_accepts_a_well_formed_packed_row():
    assert check_batch_semantics(_packed()) == (1, 10, 4)


@pytest.mark.parametrize(
    "field, index, value, rule",
    [
        ("segment_ids", 4, 0, "padding"),
        ("segment_ids", 5, 3, "count 1, 2"),
        ("positions", 5, 5, "restart"),
        ("loss_mask", 9, True, "padding tokens carry loss"),
        ("loss_mask", 4, True, "last token of a segment"),
        ("tile_valid", 0, False, "valid tile slots must come first"),
        ("tile_image", 3, 1, "tile_image"),
        ("token_tile", 6, 3, "token_tile"),
        ("token_image", 9, 0, "-1 on padding"),
        ("token_image", 6, 2, "without valid tiles"),
    ],
)
def test_semantic_check_names_the_broken_rule(field, index, value, rule):
    batch = _packed()
    batch[field][0, index] = value
    with pytest.raises(ValueError, match=f"row 0: .*{rule}"):
        check_batch_semantics(batch)


def test_semantic_check_requires_zero_padding_pixels():
    batch = _packed()
    batch["pixel_values"][0, 3] = 0.5
    with pytest.raises(ValueError, match="zeros"):
        check_batch_semantics(batch)
