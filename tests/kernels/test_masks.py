"""Mask ids, the element predicate and block maps of `kernels.masks` (plain JAX, no kernels).

Also home of `make_mask`, the mask cases shared by the kernel and oracle tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import masks
from kernels.tile_attention import BlockSizes, mask_blocks
from nvlm_jax.models.attention import MaskSpec

MASK_CASES = ("none", "causal", "packed", "cache", "segments", "cross")


def _packed_ids(rng, b, s):
    """Segment ids of packed documents (1, 2, ...; a trailing run of 0 = padding) and positions."""
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        i, doc = 0, 1
        end = s - int(rng.integers(0, max(1, s // 4)))  # some padding at the end
        while i < end:
            n = int(rng.integers(1, max(2, end - i + 1)))
            seg[r, i:i + n], pos[r, i:i + n] = doc, np.arange(n)
            i, doc = i + n, doc + 1
    return seg, pos


def _cross_ids(rng, b, s, tiles, tile_len):
    """NVLM-X/H ids: memory of `tiles` tile slots (some padding, image -1); a prompt of text,
    then per image `<Image>`, tile tags (2 tokens each), text; text before the first image sees
    nothing."""
    q_image = np.full((b, s), -1, np.int32)
    q_tile = np.full((b, s), -1, np.int32)
    kv_image = np.full((b, tiles * tile_len), -1, np.int32)
    kv_tile = np.repeat(np.arange(tiles, dtype=np.int32), tile_len)[None].repeat(b, 0)
    for r in range(b):
        used = int(rng.integers(1, tiles + 1))
        images = np.sort(rng.integers(0, 2, used)).astype(np.int32)
        images -= images[0]
        kv_image[r] = np.repeat(np.concatenate([images, np.full(tiles - used, -1, np.int32)]), tile_len)
        i = int(rng.integers(1, 4))  # text before any image
        for slot in range(used):
            if i >= s:
                break
            q_image[r, i:] = images[slot]  # later text belongs to the latest image
            q_tile[r, i:i + 2] = slot
            i += 2 + int(rng.integers(0, 3))
    return q_image, q_tile, kv_image, kv_tile


def make_mask(case: str, b: int, s: int, t: int, seed: int = 0) -> MaskSpec:
    """A mask of kind `case` for q_len s and kv_len t (ids realistic for the model's call sites).

    none: ViT; causal: plain causal; packed: decoder self-attention over packed documents with
    padding (needs s == t); cache: decoding s new tokens into a t-slot KV cache whose unfilled
    slots have segment 0; segments: non-causal segments where some query segments have no key
    (rows that see nothing); cross: the NVLM-X/H tile/image rule (t = tiles x tile_len).
    """
    rng = np.random.default_rng(seed)
    if case == "none":
        return MaskSpec()
    if case == "causal":
        return MaskSpec(causal=True)
    if case == "packed":
        assert s == t, "packed self-attention needs s == t"
        seg, pos = _packed_ids(rng, b, s)
        return MaskSpec(causal=True, causal_by_index=True, q_segment_ids=jnp.asarray(seg),
                        kv_segment_ids=jnp.asarray(seg), q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos))
    if case == "cache":
        start = rng.integers(0, t - s + 1, b)  # cache index per row
        q_pos = (start[:, None] + np.arange(s)).astype(np.int32)
        kv_seg = (np.arange(t)[None] < (start + s)[:, None]).astype(np.int32)
        return MaskSpec(causal=True, q_segment_ids=jnp.ones((b, s), jnp.int32), kv_segment_ids=jnp.asarray(kv_seg),
                        q_positions=jnp.asarray(q_pos), kv_positions=jnp.broadcast_to(jnp.arange(t), (b, t)))
    if case == "segments":
        q_seg = rng.integers(0, 4, (b, s)).astype(np.int32)
        kv_seg = rng.integers(0, 3, (b, t)).astype(np.int32)  # segment 3 queries see nothing
        return MaskSpec(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    if case == "cross":
        tile_len = 8 if t % 8 == 0 else 1
        ids = _cross_ids(rng, b, s, t // tile_len, tile_len)
        return MaskSpec(**dict(zip(("q_image", "q_tile", "kv_image", "kv_tile"), map(jnp.asarray, ids), strict=True)))
    raise ValueError(f"unknown mask case {case!r}")


# Jitted once per layout and shape: eager dispatch would compile every small op separately.
_pack_ids = jax.jit(masks.pack_ids, static_argnums=(1, 2, 3, 4))
_block_map = jax.jit(masks.block_map, static_argnums=(0, 3, 4))
_dense_from_ids = jax.jit(masks.dense_from_ids, static_argnums=0)


def _packed(spec, s, t, b, block_q, block_k):
    layout = masks.MaskLayout.from_spec(spec, s, t)
    q_pad, kv_pad = -(-s // block_q) * block_q, -(-t // block_k) * block_k
    q_ids, kv_ids = _pack_ids(spec, layout, b, q_pad, kv_pad)
    return layout, q_ids, kv_ids


def _exact_kinds(dense, block_q, block_k):
    """The exact block map of a dense [b, q_pad, kv_pad] mask (what the summaries approximate)."""
    b, sq, sk = dense.shape
    blocks = np.asarray(dense).reshape(b, sq // block_q, block_q, sk // block_k, block_k)
    anyv, allv = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
    return np.where(~anyv, 0, np.where(allv, 2, 1))


@pytest.mark.parametrize("case", MASK_CASES)
def test_predicate_on_packed_ids_equals_the_dense_mask(case):
    b, s = 2, 23
    t = 24 if case == "cross" else (23 if case == "packed" else 30)
    spec = make_mask(case, b, s, t, seed=3)
    layout, q_ids, kv_ids = _packed(spec, s, t, b, 8, 16)
    got = np.asarray(_dense_from_ids(layout, q_ids, kv_ids))[:, :s, :t]
    want = spec.dense(b, s, t)
    want = np.ones((b, s, t), bool) if want is None else np.asarray(want)
    np.testing.assert_array_equal(got, want)
    assert not np.asarray(_dense_from_ids(layout, q_ids, kv_ids))[:, :, t:].any(), "padded keys are visible"


@pytest.mark.parametrize("case", MASK_CASES)
def test_block_map_is_conservative(case):
    # 0 only where nothing is visible and 2 only where everything is, for every block of random
    # masks of each kind, with lengths not multiple of the blocks. (Fixed shapes per case keep
    # the eager ops compiled once.)
    b, s = 2, 37
    t = 40 if case in ("cross", "cache", "segments") else 37
    for seed in range(4):
        block_q, block_k = (8, 16) if seed % 2 else (16, 8)
        spec = make_mask(case, b, s, t, seed=seed)
        layout, q_ids, kv_ids = _packed(spec, s, t, b, block_q, block_k)
        kinds = np.asarray(_block_map(layout, q_ids, kv_ids, block_q, block_k))
        exact = _exact_kinds(_dense_from_ids(layout, q_ids, kv_ids), block_q, block_k)
        assert not ((kinds == 0) & (exact != 0)).any(), "a block with a visible element is marked skipped"
        assert not ((kinds == 2) & (exact != 2)).any(), "a block with a hidden element is marked fully visible"


def test_block_map_is_conservative_on_unstructured_ids():
    # Ids in no particular order, all four rules at once: the summaries stay conservative.
    rng = np.random.default_rng(0)
    b, s, t = 2, 29, 35

    def ids(lo, hi, n):
        return jnp.asarray(rng.integers(lo, hi, (b, n)).astype(np.int32))

    for trial in range(12):
        spec = MaskSpec(causal=True, causal_by_index=bool(trial % 2), q_segment_ids=ids(0, 3, s),
                        kv_segment_ids=ids(0, 3, t), q_positions=ids(0, 9, s), kv_positions=ids(0, 9, t),
                        q_image=ids(-1, 3, s), q_tile=ids(-1, 3, s), kv_image=ids(-1, 3, t), kv_tile=ids(0, 3, t))
        layout, q_ids, kv_ids = _packed(spec, s, t, b, 8, 8)
        kinds = np.asarray(_block_map(layout, q_ids, kv_ids, 8, 8))
        exact = _exact_kinds(_dense_from_ids(layout, q_ids, kv_ids), 8, 8)
        assert not ((kinds == 0) & (exact != 0)).any()
        assert not ((kinds == 2) & (exact != 2)).any()


def test_packed_causal_sequence_skips_every_empty_block():
    # Four documents of 64, 32, 96, 64 tokens, blocks of 32: the summaries find exactly the empty
    # blocks (upper triangle and cross-document blocks).
    lengths = [64, 32, 96, 64]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)[None]
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)[None]
    spec = MaskSpec(causal=True, causal_by_index=True, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                    q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos))
    kinds = np.asarray(mask_blocks(spec, 1, 256, 256, BlockSizes(32, 32)))
    exact = _exact_kinds(spec.dense(1, 256, 256), 32, 32)
    np.testing.assert_array_equal(kinds, exact)
    # 64 blocks: 8 on the diagonal (partial: causal inside the block) and 1 + 0 + 3 + 1 fully
    # visible below-diagonal blocks inside the four documents; the other 51 are skipped.
    assert (kinds == 1).sum() == 8
    assert (kinds == 2).sum() == 1 + 0 + 3 + 1
    assert (kinds == 0).sum() == 51
    _, _, counts = masks.block_lists(jnp.asarray(kinds))
    np.testing.assert_array_equal(np.asarray(counts)[0], [1, 2, 1, 1, 2, 3, 1, 2])


def test_cross_attention_blocks_of_other_tiles_are_skipped():
    # 1,024-query prompt shape of NVLM-X scaled down: 4 tile slots of 32 memory tokens, tags of
    # block-aligned query ranges. Tag rows of tile k skip every other tile's memory block.
    t, tile_len = 128, 32
    q_tile = np.full((1, 64), -1, np.int32)
    q_image = np.full((1, 64), 0, np.int32)
    q_image[0, :16] = -1  # text before the image sees nothing
    for k in range(3):
        q_tile[0, 16 + 16 * k: 32 + 16 * k] = k  # block-aligned tags of tiles 0..2 (tile 3 is padding)
    kv_image = np.repeat([0, 0, 0, -1], tile_len)[None].astype(np.int32)
    kv_tile = np.repeat(np.arange(4), tile_len)[None].astype(np.int32)
    spec = MaskSpec(q_image=jnp.asarray(q_image), q_tile=jnp.asarray(q_tile), kv_image=jnp.asarray(kv_image),
                    kv_tile=jnp.asarray(kv_tile))
    kinds = np.asarray(mask_blocks(spec, 1, 64, t, BlockSizes(16, 32)))
    want = np.zeros((4, 4), int)
    want[1, 0] = want[2, 1] = want[3, 2] = 2  # each tag block sees exactly its tile
    np.testing.assert_array_equal(kinds[0], want)
    assert masks.skipped_fraction(jnp.asarray(kinds)) == 13 / 16


def test_maskless_vit_blocks_are_full_except_the_padded_tail():
    # 1025 ViT tokens in 128-blocks: 9 x 9 blocks; only the last key block (1 real key) is masked.
    kinds = np.asarray(mask_blocks(MaskSpec(), 2, 1025, 1025, BlockSizes(128, 128)))
    assert kinds.shape == (2, 9, 9)
    assert (kinds[:, :, :8] == 2).all() and (kinds[:, :, 8] == 1).all()


def test_block_lists_put_visible_blocks_first_in_order():
    kinds = jnp.asarray([[[0, 2, 0, 1], [0, 0, 0, 0], [1, 1, 2, 2]]])
    index, kind, count = masks.block_lists(kinds)
    np.testing.assert_array_equal(count, [[2, 0, 4]])
    np.testing.assert_array_equal(index[0, 0, :2], [1, 3])
    np.testing.assert_array_equal(kind[0, 0, :2], [2, 1])
    np.testing.assert_array_equal(index[0, 2], [0, 1, 2, 3])


def test_partial_cross_attention_ids_are_an_error():
    with pytest.raises(ValueError, match="needs all of"):
        masks.MaskLayout.from_spec(MaskSpec(q_image=jnp.zeros((1, 4), jnp.int32)), 4, 4)
