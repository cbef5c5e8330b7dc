"""Token streams shaped like NVLM-X/H prompts for model tests (ids are arbitrary, not tokenized)."""

import numpy as np

TAG_TOKENS = 2  # tokens per tile tag in these synthetic prompts


def build_row(arch, tiles_per_image, n_tokens, ctx_id, slots, seed=0, text_before=3, text_between=2, text_after=4):
    """One row: text, then per image `<Image>` + per tile a tag (+ context tokens where the arch puts
    the tile in the decoder) + `</Image>`, text between and after.

    Returns dict of int arrays: input_ids [S], token_image [S], token_tile [S], tile_image [slots],
    tile_valid [slots], plus `tag_positions` {slot: [token indices]} and `image_start` [per image].
    """
    rng = np.random.default_rng(seed)
    ids, tok_image, tok_tile = [], [], []
    tile_image = np.full(slots, -1, np.int32)
    tags, starts = {}, []

    def text(n, image, tile=-1):
        for _ in range(n):
            ids.append(int(rng.integers(1, ctx_id - 1)))
            tok_image.append(image)
            tok_tile.append(tile)

    text(text_before, -1)
    slot = 0
    for img, count in enumerate(tiles_per_image):
        if img:
            text(text_between, img - 1)
        starts.append(len(ids))
        text(1, img)  # <Image>
        for k in range(count):
            thumb = k == count - 1
            tags[slot] = list(range(len(ids), len(ids) + TAG_TOKENS))
            text(TAG_TOKENS, img, slot)
            in_decoder = arch == "D" or (arch == "H" and thumb)
            if in_decoder:
                for _ in range(n_tokens):
                    ids.append(ctx_id)
                    tok_image.append(img)
                    tok_tile.append(-1)
            tile_image[slot] = img
            slot += 1
        text(1, img)  # </Image>
    text(text_after, len(tiles_per_image) - 1)
    return dict(input_ids=np.asarray(ids, np.int32), token_image=np.asarray(tok_image, np.int32),
                token_tile=np.asarray(tok_tile, np.int32), tile_image=tile_image, tile_valid=tile_image >= 0,
                tag_positions=tags, image_start=starts)
