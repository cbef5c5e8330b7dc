"""Batches built directly from the batch contract (`nvlm_jax.data.batch`) for training tests,
and a tiny deterministic iterator with `get_state`/`set_state` like a Grain iterator."""

from __future__ import annotations

import numpy as np

from nvlm_jax.config import NVLMConfig


def sample(cfg: NVLMConfig, rng: np.random.Generator, prompt_len: int = 5, answer_len: int = 3,
           tiles: int = 1) -> dict:
    """One unpacked sample: text, one image of `tiles` tiles (D/H: context tokens in the text),
    more text, then an answer. Returns token ids, loss mask over next-token targets, pixels,
    and the per-token tile tag / image indices."""
    ctx = cfg.image_context_token_id
    n = cfg.num_image_tokens
    text = lambda k: list(rng.integers(1, ctx - 1, k))  # noqa: E731
    ids, tile_of_token = text(2), [-1, -1]
    for t in range(tiles):
        ids += text(1)
        tile_of_token.append(t)  # the tag token names tile t
        if cfg.arch != "X":
            ids += [ctx] * n
            tile_of_token += [-1] * n
    ids += text(prompt_len)
    tile_of_token += [-1] * prompt_len
    answer_start = len(ids)
    ids += text(answer_len)
    tile_of_token += [-1] * answer_len
    ids = np.asarray(ids, np.int32)
    targets = np.append(ids[1:], 0).astype(np.int32)
    loss_mask = np.zeros(len(ids), bool)
    loss_mask[answer_start - 1: len(ids) - 1] = True  # predict the answer tokens
    size = cfg.vision.image_size
    pixels = rng.normal(size=(tiles, size, size, 3)).astype(np.float32)
    return dict(ids=ids, targets=targets, loss_mask=loss_mask, pixels=pixels,
                token_tile=np.asarray(tile_of_token, np.int32))


def pack(cfg: NVLMConfig, rows: list[list[dict]], seq_len: int, tile_slots: int) -> dict[str, np.ndarray]:
    """Packs samples into rows (each inner list is one row) following the batch contract."""
    b = len(rows)
    size = cfg.vision.image_size
    out = dict(
        input_ids=np.zeros((b, seq_len), np.int32),
        targets=np.zeros((b, seq_len), np.int32),
        loss_mask=np.zeros((b, seq_len), bool),
        segment_ids=np.zeros((b, seq_len), np.int32),
        positions=np.zeros((b, seq_len), np.int32),
        pixel_values=np.zeros((b, tile_slots, size, size, 3), np.float32),
        tile_valid=np.zeros((b, tile_slots), bool),
        tile_image=np.full((b, tile_slots), -1, np.int32),
        token_image=np.full((b, seq_len), -1, np.int32),
        token_tile=np.full((b, seq_len), -1, np.int32),
    )
    for r, samples in enumerate(rows):
        pos, slot = 0, 0
        for seg, s in enumerate(samples, start=1):
            n, t = len(s["ids"]), len(s["pixels"])
            if pos + n > seq_len or slot + t > tile_slots:
                raise ValueError(f"row {r} overflows seq_len {seq_len} or tile_slots {tile_slots}")
            sl = slice(pos, pos + n)
            out["input_ids"][r, sl] = s["ids"]
            out["targets"][r, sl] = s["targets"]
            out["loss_mask"][r, sl] = s["loss_mask"]
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            out["pixel_values"][r, slot: slot + t] = s["pixels"]
            out["tile_valid"][r, slot: slot + t] = True
            out["tile_image"][r, slot: slot + t] = seg - 1
            out["token_image"][r, pos + 2: pos + n] = seg - 1  # the image starts at index 2
            tt = s["token_tile"]
            out["token_tile"][r, sl] = np.where(tt >= 0, tt + slot, -1)
            pos, slot = pos + n, slot + t
    return out


def random_batch(cfg: NVLMConfig, seed: int, batch_size: int = 2, seq_len: int = 32, tile_slots: int = 2) -> dict:
    """`batch_size` rows of one random sample each."""
    rng = np.random.default_rng(seed)
    return pack(cfg, [[sample(cfg, rng)] for _ in range(batch_size)], seq_len, tile_slots)


class FakeIterator:
    """Deterministic infinite batches: batch i depends only on (seed, i). Checkpointable."""

    def __init__(self, cfg: NVLMConfig, seed: int = 0, **batch_kwargs):
        self.cfg, self.seed, self.batch_kwargs, self.index = cfg, seed, batch_kwargs, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = random_batch(self.cfg, self.seed * 100_003 + self.index, **self.batch_kwargs)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def random_params(cfg: NVLMConfig, seed: int = 0, mesh=None):
    """Random params of `cfg`'s shapes (normal, std 0.05) without compiling the model's
    initialiser; placed on `mesh` by the logical rules when given."""
    import jax

    from nvlm_jax.models import nvlm
    from nvlm_jax.sharding import tree_shardings
    from nvlm_jax.train.step import param_shapes

    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(s.dtype), param_shapes(cfg))
    if mesh is None:
        return jax.device_put(params)
    return jax.device_put(params, tree_shardings(nvlm.abstract_params(cfg), mesh))
