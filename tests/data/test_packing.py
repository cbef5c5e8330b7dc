"""Tests for nvlm_jax.data.packing: row layout, first-fit packing with exact resume, batching."""

import grain
import numpy as np
import pytest

from nvlm_jax.data import packing
from nvlm_jax.data import transforms as tr
from nvlm_jax.data.batch import check_batch_semantics
from nvlm_jax.processing import tiling

PAD = 0
TILE = 4


def _example(uid, length, images=(), source="s"):
    """`length` tokens with ids uid*100+t; images = tiles per image, tags naming each tile once."""
    ids = (uid * 100 + np.arange(length)).astype(np.int32)
    n = int(sum(images))
    token_tile = np.full(length, -1, np.int32)
    token_tile[1 : 1 + n] = np.arange(n)  # one "tag" token per tile
    token_image = np.full(length, -1, np.int32)
    for i, _ in enumerate(images):
        token_image[1 + i :] = i
    pixels = np.full((n, TILE, TILE, 3), uid % 256, np.uint8)
    return tr.Example(
        source,
        f"{source}#{uid}",
        input_ids=ids,
        targets=np.roll(ids, -1),
        loss_mask=np.arange(length) == length - 2,
        token_image=token_image,
        token_tile=token_tile,
        pixels=pixels,
        tile_image=np.repeat(np.arange(len(images), dtype=np.int32), images),
        stats={source: {"seen": 1}},
    )


def _rows(examples, **kw):
    ds = grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return packing.PackExamples(ds, pad_id=PAD, **kw)


def _uids(row):
    seg, ids = row.tokens["segment_ids"], row.tokens["input_ids"]
    return [int(ids[seg == k][0]) // 100 for k in range(1, seg.max() + 1)]


def test_build_row_restarts_positions_and_offsets_images_and_tiles():
    a, b = _example(1, 5, images=(2,)), _example(2, 4, images=(1, 1))
    row = packing.build_row([a, b], seq_len=12, pad_id=PAD)
    t = row.tokens
    assert t["segment_ids"].tolist() == [1] * 5 + [2] * 4 + [0] * 3
    assert t["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]
    assert t["token_tile"].tolist() == [-1, 0, 1, -1, -1, -1, 2, 3, -1, -1, -1, -1]
    assert t["token_image"].tolist() == [-1, 0, 0, 0, 0, -1, 1, 2, 2, -1, -1, -1]
    assert row.tile_image.tolist() == [0, 0, 1, 2]
    assert t["input_ids"][9:].tolist() == [PAD] * 3 and not t["loss_mask"][9:].any()
    assert [p.shape[0] for p in row.pixels] == [2, 2]
    assert row.stats == {"s": {"seen": 2}}
    with pytest.raises(ValueError, match="do not fit"):
        packing.build_row([a, b], seq_len=8, pad_id=PAD)


def test_first_fit_respects_token_and_tile_capacity_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    examples = [
        _example(i, int(rng.integers(8, 20)), images=tuple(int(x) for x in rng.integers(1, 4, rng.integers(0, 3))))
        for i in range(200)
    ]
    rows = list(_rows(examples, seq_len=32, tiles_per_row=6, num_bins=3))
    uids = [u for r in rows for u in _uids(r)]
    assert sorted(uids) == list(range(200))
    for r in rows:
        assert (r.tokens["segment_ids"] > 0).sum() <= 32 and r.num_tiles <= 6
    single = list(_rows(examples, seq_len=32, tiles_per_row=6, num_bins=1))
    assert [u for r in single for u in _uids(r)] == list(range(200))  # next-fit keeps order
    assert len(rows) <= len(single)


def test_first_fit_puts_a_sample_into_the_first_row_with_room():
    examples = [_example(0, 10), _example(1, 8), _example(2, 2), _example(3, 3), _example(4, 6), _example(5, 5)]
    rows = list(_rows(examples, seq_len=12, tiles_per_row=1, num_bins=2))
    # 4 fits no open row and both bins are open: the window is emitted and 4 starts the next one.
    assert [_uids(r) for r in rows] == [[0, 2], [1, 3], [4, 5]]


@pytest.mark.parametrize("num_bins", [1, 3])
def test_restoring_any_saved_state_gives_the_same_remaining_rows(num_bins):
    rng = np.random.default_rng(1)
    examples = [_example(i, int(rng.integers(4, 14)), images=(int(rng.integers(1, 3)),) * (i % 2)) for i in range(60)]
    ds = _rows(examples, seq_len=16, tiles_per_row=4, num_bins=num_bins)
    it = iter(ds)
    states, rows = [it.get_state()], []
    for row in it:
        rows.append(_uids(row))
        states.append(it.get_state())
    for k, state in enumerate(states):
        resumed = iter(ds)
        resumed.set_state(state)
        assert [_uids(r) for r in resumed] == rows[k:], k


def test_oversized_sample_is_an_error_naming_the_record():
    with pytest.raises(ValueError, match="s#7: 40 tokens"):
        list(_rows([_example(7, 40)], seq_len=16, tiles_per_row=4, num_bins=2))


def test_example_to_row_puts_one_sample_per_row():
    row = packing.ExampleToRow(10, PAD).map(_example(3, 6, images=(2,)))
    assert row.tokens["segment_ids"].tolist() == [1] * 6 + [0] * 4 and row.num_tiles == 2


def test_batch_rows_normalises_pixels_and_completes_short_batches():
    rows = [
        packing.build_row([_example(1, 5, images=(2,)), _example(2, 3, images=(1,))], seq_len=10, pad_id=PAD),
        packing.build_row([_example(3, 4)], seq_len=10, pad_id=PAD),
    ]
    batch = packing.BatchRows(batch_size=3, seq_len=10, tiles_per_row=4, tile_size=TILE, pad_id=PAD)(rows)
    stats = batch.pop(packing.STATS_KEY)
    assert check_batch_semantics(batch) == (3, 10, 4)
    assert stats == {"s": {"seen": 3}}
    assert batch["tile_valid"].tolist() == [[True] * 3 + [False], [False] * 4, [False] * 4]
    assert batch["tile_image"][0].tolist() == [0, 0, 1, -1]
    expected = tiling.normalize_tiles(np.full((TILE, TILE, 3), 2, np.uint8))
    np.testing.assert_array_equal(batch["pixel_values"][0, 2], expected)
    assert not batch["pixel_values"][0, 3].any() and not batch["pixel_values"][1:].any()
    assert (batch["segment_ids"][2] == 0).all() and not batch["loss_mask"][2].any()
    assert batch["input_ids"].dtype == np.int32 and batch["pixel_values"].dtype == np.float32


def test_batch_rows_can_write_pixels_straight_into_shared_memory():
    rows = [packing.build_row([_example(1, 5, images=(2,))], seq_len=10, pad_id=PAD)]
    make = packing.BatchRows(batch_size=2, seq_len=10, tiles_per_row=3, tile_size=TILE, pad_id=PAD)
    plain = make(rows)
    make.enable_shared_memory_output()
    shared = make(rows)
    pixels = shared["pixel_values"]
    assert isinstance(pixels, grain.multiprocessing.SharedMemoryArray)
    np.testing.assert_array_equal(np.asarray(pixels), plain["pixel_values"])
    pixels.unlink_on_del()
