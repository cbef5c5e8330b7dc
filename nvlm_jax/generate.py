"""Autoregressive generation with a KV cache: one jit-compiled prefill + `lax.while_loop` decode.

Batching: prompts of different lengths are left-padded to a common bucketed length `P`; pad
slots get segment id 0 (never attended) and real tokens positions `0..n-1`, so every row
computes what it would compute alone. The cache holds `P + max_new_tokens` slots; new tokens
of all rows are written at slot `P + step` with their own positions `n_i + step`.

Images: `encode_images` runs once per call (tiles padded to a power-of-two bucket with a
validity mask), and the prefill merges the features at the image context tokens.

NVLM-X/H: each row has its own tiles, padded to a common power-of-two number of slots `T`
(padding slots invalid), and the per-token ids of the batch contract (`token_image`,
`token_tile`; -1 on left padding). `NVLM.encode` runs once per call and yields the image
context: the thumbnails' features for the prefill (H) and the cross-attention keys/values of
every block, which every decode step reuses (`memory_only`). Generated tokens belong to the
row's latest image (`token_image` = the prompt's last one) and name no tile (`token_tile` = -1).
NVLM-D takes per-row tiles the same way when given a `[batch, tiles, H, W, 3]` array (with
`tile_valid`): batches of one shape then share one compiled program.

Sampling (per step, all in f32; `suppress_token_ids` are never chosen): greedy argmax, or
temperature → top-k → top-p (nucleus) → categorical with key `fold_in(PRNGKey(seed), step)`:
the same seed gives the same tokens. A row stops after emitting any stop token (that token is
kept; later slots hold `pad_id`); the loop ends when every row has stopped or `max_new_tokens`
were produced.

Shapes are static per (batch, prompt bucket, tile bucket, max_new_tokens, greedy or sampling);
temperature, top_k and top_p are runtime values, so repeated calls reuse the compiled programs.

The pieces are shared with the server's continuous-batching engine (`nvlm_jax.serve.engine`):
`prefill_step`, `decode_step` (each row may write its own cache slot and position),
`step_images`, and the token choice of `nvlm_jax.sampling` (`sample_logits` with per-row
settings and keys, `apply_penalties`; re-exported here).

Training-format rows (`nvlm_jax.data.batch`) decode through the same function:
`nvlm_jax.batch_decode` cuts each row after its last prompt token and answers it, as the
in-training evaluation and `launch.ask` do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models.llm import init_cache
from nvlm_jax.models.nvlm import NVLM, ImageContext, check_image_token_count
from nvlm_jax.sampling import GREEDY, SamplingParams, apply_penalties, sample_logits  # noqa: F401 (re-exported)
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules

PROMPT_BUCKET = 64
Runner = Callable[..., Any]  # runner(jitted, *args, **static_args) -> jitted(*args, **static_args)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """`jax.set_mesh(mesh)` + the logical-axis rules when a mesh is given; nothing otherwise."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def prefill_step(model: NVLM, variables, ids, positions, segment_ids, last, images: dict, cache):
    """Runs prompts `ids [b, P]` through the decoder into `cache` from slot 0.

    last: [b] the index of each row's last prompt token (P - 1 when left-padded). images: the
    model's image keyword arguments. Returns (the logits there [b, vocab] f32, the cache); the
    logits of other positions are never computed.
    """
    _, cache, hidden = model.apply(
        variables, ids, **images, positions=positions, segment_ids=segment_ids, cache=cache, cache_index=0,
        return_hidden=True,
    )
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [b, 1, E]
    return model.apply(variables, hidden, method=lambda m, h: m.llm.logits(h))[:, 0], cache


def decode_step(model: NVLM, variables, tokens, positions, cache, cache_index, images: dict):
    """One token per row: tokens and positions [b]; the keys/values go to cache slot `cache_index`
    (an int for every row, or [b]: each row its own). Returns (logits [b, vocab] f32, cache)."""
    logits, cache = model.apply(
        variables, tokens[:, None], **images, positions=positions[:, None],
        segment_ids=jnp.ones_like(tokens)[:, None], cache=cache, cache_index=cache_index,
    )
    return logits[:, 0], cache


def step_images(cfg: NVLMConfig, image_context: ImageContext | None, new_image) -> dict:
    """The decode steps' image arguments: NVLM-X/H reuse the image memory's keys/values and
    new tokens belong to the row's latest image (`new_image [b]`) and no tile; D needs none."""
    if cfg.arch not in ("X", "H"):
        return {}
    b = new_image.shape[0]
    return dict(image_context=image_context.memory_only(), token_image=new_image[:, None],
                token_tile=jnp.full((b, 1), -1, jnp.int32))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts. ids/positions/segment_ids: [batch, P]; lengths: [batch]."""

    ids: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    lengths: np.ndarray


def _rows(input_ids, attention_mask) -> list[np.ndarray]:
    if isinstance(input_ids, np.ndarray | jax.Array) and np.ndim(input_ids) == 2:
        ids = np.asarray(input_ids)
        if attention_mask is None:
            return [row for row in ids]
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        return [row[m] for row, m in zip(ids, mask, strict=True)]
    if attention_mask is not None:
        raise ValueError("attention_mask needs input_ids as one [batch, seq] array")
    if isinstance(input_ids, np.ndarray | jax.Array) and np.ndim(input_ids) == 1:
        return [np.asarray(input_ids)]
    return [np.asarray(r) for r in input_ids]


def pad_prompts(
    input_ids, attention_mask=None, *, pad_id: int = 0, bucket: int = PROMPT_BUCKET
) -> PromptBatch:
    """Left-pads prompts to a common length rounded up to a multiple of `bucket`.

    input_ids: `[batch, seq]` (with an optional 0/1 `attention_mask` marking real tokens, on
    either side) or a list of 1-D sequences of different lengths.
    """
    rows = _rows(input_ids, attention_mask)
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([r.size for r in rows], np.int32)
    width = int(-(-lengths.max() // bucket) * bucket)
    b = len(rows)
    ids = np.full((b, width), pad_id, np.int32)
    positions = np.zeros((b, width), np.int32)
    segments = np.zeros((b, width), np.int32)
    for i, r in enumerate(rows):
        n = r.size
        ids[i, width - n :] = r
        positions[i, width - n :] = np.arange(n)
        segments[i, width - n :] = 1
    return PromptBatch(ids, positions, segments, lengths)


def tile_bucket(n: int) -> int:
    """Tiles are padded to the next power of two (1, 2, 4, 8, ...)."""
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_images(params, pixels, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, pixels, method=NVLM.encode_images)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_context(params, ids, pixels, tile_valid, tile_image, token_tile, *, cfg: NVLMConfig) -> ImageContext:
    return NVLM(cfg).apply({"params": params}, ids, pixels, tile_valid, tile_image, token_tile, method=NVLM.encode)


@dataclasses.dataclass(frozen=True)
class RowTiles:
    """NVLM-X/H inputs of a left-padded batch (see `prepare_row_tiles`).

    pixels [batch, T, H, W, 3] f32, tile_valid [batch, T] bool, tile_image [batch, T] int32 (-1 on
    padding slots), token_image / token_tile [batch, P] int32 (-1 on padding tokens), and
    new_image [batch] int32: the `token_image` of generated tokens (the row's latest image).
    """

    pixels: np.ndarray
    tile_valid: np.ndarray
    tile_image: np.ndarray
    token_image: np.ndarray
    token_tile: np.ndarray
    new_image: np.ndarray


def _per_row(name: str, values, batch: int) -> list:
    if values is None:
        return [None] * batch
    if isinstance(values, np.ndarray | jax.Array):
        values = list(values)
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} rows for {batch} prompts")
    return list(values)


def _row_slots(pixel_values, tile_valid, tile_image, batch: int, image_ids: bool = True):
    """Per row: pixels [n, H, W, 3], valid [n], image [n] (n may be 0). Without `image_ids`
    (NVLM-D), a missing tile_image counts every tile as image 0."""
    if isinstance(pixel_values, np.ndarray | jax.Array) and np.ndim(pixel_values) != 5:
        raise ValueError(
            f"NVLM-X/H take per-row tiles: pixel_values must be [batch, tiles, H, W, 3] or a list with one "
            f"[tiles, H, W, 3] array (or None) per prompt, got shape {np.shape(pixel_values)}"
        )
    pixel_rows = _per_row("pixel_values", pixel_values, batch)
    valid_rows = _per_row("tile_valid", tile_valid, batch)
    image_rows = _per_row("tile_image", tile_image, batch)
    rows = []
    for i, (px, valid, image) in enumerate(zip(pixel_rows, valid_rows, image_rows, strict=True)):
        if px is None or np.shape(px)[0] == 0:
            rows.append(None)
            continue
        px = np.asarray(px, np.float32)
        if px.ndim != 4:
            raise ValueError(f"pixel_values of prompt {i} must be [tiles, H, W, 3], got shape {px.shape}")
        n = px.shape[0]
        if image is None and not image_ids:
            image = np.zeros(n, np.int32)
        if image is None:
            raise ValueError(f"prompt {i} has {n} tiles but no tile_image (the image index of each tile)")
        image = np.asarray(image, np.int32)
        valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        if image.shape != (n,) or valid.shape != (n,):
            raise ValueError(f"prompt {i}: tile_image {image.shape} and tile_valid {valid.shape} must be [{n}] "
                             "like its tiles")
        rows.append((px, valid, np.where(valid, image, -1)))
    return rows


def _thumbnails(valid: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Host twin of `nvlm.thumbnail_slots` for one row: the last valid slot of each image."""
    nxt_image = np.append(image[1:], -1)
    nxt_valid = np.append(valid[1:], False)
    return valid & ((nxt_image != image) | ~nxt_valid)


def prepare_row_tiles(
    cfg: NVLMConfig,
    batch: PromptBatch,
    pixel_values,
    token_image,
    token_tile,
    tile_image,
    tile_valid=None,
    attention_mask=None,
) -> RowTiles:
    """Checks the per-row tile inputs of each prompt on the host and pads them to the batch's shapes.

    Used for X/H, and for D given per-row tiles (where token_image / token_tile may be None).
    pixel_values: a list with one `[tiles_i, H, W, 3]` array (or None) per prompt, or one
    `[batch, tiles, H, W, 3]` array (with `tile_valid [batch, tiles]`); tile_image: the image index
    of each tile, per prompt; token_image / token_tile: per prompt, one id per prompt token (as
    `input_ids`: a list of 1-D arrays, or `[batch, seq]` arrays with the same `attention_mask`).
    Tile slots are padded to `tile_bucket(max tiles)`.
    """
    b, p = batch.ids.shape
    if cfg.arch == "D":  # the ids only matter for cross-attention
        token_image = token_tile = [np.full(n, -1, np.int32) for n in batch.lengths]
    if token_image is None or token_tile is None:
        raise ValueError(f"NVLM-{cfg.arch} generation needs token_image and token_tile for every prompt "
                         "(see nvlm_jax.processing.prompt.cross_attention_ids)")
    token_image_rows = _rows(token_image, attention_mask)
    token_tile_rows = _rows(token_tile, attention_mask)
    slots = _row_slots(pixel_values, tile_valid, tile_image, b, image_ids=cfg.arch != "D")
    for name, rows in (("token_image", token_image_rows), ("token_tile", token_tile_rows)):
        if len(rows) != b:
            raise ValueError(f"{name} has {len(rows)} rows for {b} prompts")
    t = tile_bucket(max([1] + [row[0].shape[0] for row in slots if row is not None]))
    size = (cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels)
    out = RowTiles(
        pixels=np.zeros((b, t) + size, np.float32),
        tile_valid=np.zeros((b, t), bool),
        tile_image=np.full((b, t), -1, np.int32),
        token_image=np.full((b, p), -1, np.int32),
        token_tile=np.full((b, p), -1, np.int32),
        new_image=np.full((b,), -1, np.int32),
    )
    for i, (row, tok_image, tok_tile) in enumerate(zip(slots, token_image_rows, token_tile_rows, strict=True)):
        n_tok = int(batch.lengths[i])
        ids = batch.ids[i, p - n_tok :]
        tok_image, tok_tile = np.asarray(tok_image, np.int32), np.asarray(tok_tile, np.int32)
        if tok_image.shape != (n_tok,) or tok_tile.shape != (n_tok,):
            raise ValueError(f"prompt {i} has {n_tok} tokens but token_image {tok_image.shape} and token_tile "
                             f"{tok_tile.shape}")
        valid = np.zeros(0, bool) if row is None else row[1]
        image = np.zeros(0, np.int32) if row is None else row[2]
        num_images = int(image.max(initial=-1)) + 1
        named = tok_tile[tok_tile >= 0]
        if named.size and (named.max() >= valid.size or not valid[named].all()):
            raise ValueError(f"prompt {i}: token_tile names tile {int(named.max())} but the prompt has "
                             f"{int(valid.sum())} valid tiles")
        if tok_image.max(initial=-1) >= num_images:
            raise ValueError(f"prompt {i}: token_image refers to image {int(tok_image.max())} but its tiles "
                             f"belong to {num_images} images")
        in_decoder = {"D": int(valid.sum()), "H": int(_thumbnails(valid, image).sum())}.get(cfg.arch, 0)
        what = {"D": "every valid tile", "H": "the thumbnails only"}.get(cfg.arch, "none")
        try:
            check_image_token_count(cfg, ids, in_decoder)
        except ValueError as e:
            raise ValueError(f"prompt {i} (NVLM-{cfg.arch}: image tokens for {what}): {e}") from None
        if row is not None:
            n = row[0].shape[0]
            if row[0].shape[1:] != size:
                raise ValueError(f"prompt {i}: tiles must be {size}, got {row[0].shape[1:]}")
            out.pixels[i, :n], out.tile_valid[i, :n], out.tile_image[i, :n] = row
        out.token_image[i, p - n_tok :] = tok_image
        out.token_tile[i, p - n_tok :] = tok_tile
        out.new_image[i] = tok_image.max(initial=-1)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "do_sample", "return_logits"))
def _generate(
    params,
    ids,
    positions,
    segment_ids,
    lengths,
    image_features,
    tile_valid,
    image_context,
    token_image,
    token_tile,
    new_image,
    key,
    temperature,
    top_k,
    top_p,
    stop_ids,
    suppress_ids,
    pad_id,
    *,
    cfg: NVLMConfig,
    max_new_tokens: int,
    do_sample: bool,
    return_logits: bool,
):
    model = NVLM(cfg)
    variables = {"params": params}
    b, p = ids.shape
    cache = init_cache(cfg.llm, b, p + max_new_tokens, jnp.dtype(cfg.dtype))
    if image_context is not None:  # per-row tiles (X/H, or D given them)
        images = dict(image_context=image_context, token_image=token_image, token_tile=token_tile)
    else:
        images = dict(image_features=image_features, tile_valid=tile_valid)
    logits0, cache = prefill_step(model, variables, ids, positions, segment_ids, jnp.full((b,), p - 1), images,
                                  cache)
    # Decode steps reuse the image memory's keys/values; new tokens hold no image context tokens.
    images = step_images(cfg, image_context, new_image)
    logits0 = logits0.at[:, suppress_ids].set(-jnp.inf)
    sample = functools.partial(sample_logits, do_sample=do_sample, top_k=top_k, temperature=temperature,
                               top_p=top_p)
    tok = sample(logits0, jax.random.fold_in(key, 0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    all_logits = jnp.zeros((b, max_new_tokens, logits0.shape[-1]), jnp.float32) if return_logits else None
    if return_logits:
        all_logits = all_logits.at[:, 0].set(logits0)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tok, done, out, all_logits = state
        pos = lengths + step - 1  # the previous token's position
        logits, cache = decode_step(model, variables, tok, pos, cache, p + step - 1, images)
        logits = logits.at[:, suppress_ids].set(-jnp.inf)
        new = sample(logits, jax.random.fold_in(key, step))
        new = jnp.where(done, pad_id, new)
        out = out.at[:, step].set(new)
        if return_logits:
            all_logits = all_logits.at[:, step].set(logits)
        return step + 1, cache, new, done | jnp.isin(new, stop_ids), out, all_logits

    step, _, _, _, out, all_logits = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, tok, done, out, all_logits)
    )
    return out, step, all_logits


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens: [batch, steps] int32 (pad after a row's stop token); logits: [batch, steps, vocab]
    f32 (the distribution each token was chosen from) when requested, else None."""

    tokens: np.ndarray
    logits: np.ndarray | None


def generate(
    params,
    cfg: NVLMConfig,
    input_ids,
    pixel_values=None,
    *,
    attention_mask=None,
    token_image=None,
    token_tile=None,
    tile_image=None,
    tile_valid=None,
    max_new_tokens: int = 32,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    suppress_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    prompt_bucket: int = PROMPT_BUCKET,
    return_logits: bool = False,
    runner: Runner | None = None,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per prompt, for any arch.

    Args:
      params: model params (on `mesh` when given).
      cfg: the model config.
      input_ids: `[batch, seq]` ids (with `attention_mask` for padded rows) or a list of 1-D
        prompts of different lengths; image context tokens must already be in place.
      pixel_values: NVLM-D: `[tiles, H, W, 3]` float, the tiles of all images of all prompts, in
        order (or a list with one `[tiles_i, H, W, 3]` array or None per prompt), or per-row
        tiles `[batch, tiles, H, W, 3]` with `tile_valid [batch, tiles]` as for X/H.
        NVLM-X/H: a list with one `[tiles_i, H, W, 3]` array (or None) per prompt, or
        `[batch, tiles, H, W, 3]` with `tile_valid [batch, tiles]` (default all valid).
      token_image, token_tile, tile_image: NVLM-X/H only (ignored for D), per prompt like
        `input_ids` / its tiles: see `nvlm_jax.processing.prompt.cross_attention_ids`.
      sampling: greedy or sampling settings; `seed` fixes the sampling noise.
      stop_token_ids: a row ends after producing one of these (e.g. `<|im_end|>`); () = never.
      suppress_token_ids: never produced (their logits are set to -inf before choosing).
      pad_token_id: written after a row has stopped and used to left-pad prompts.
      mesh / rules: run sharded (params should already be placed on `mesh`).
      return_logits: also return each step's logits (for tests; memory batch·steps·vocab).
      runner: calls the jitted programs, `runner(jitted, *args, **static)`; multi-process
        training passes `nvlm_jax.train.multihost.synced_call` (default: a plain call). Results
        are read back whole on every process, even when sharded over several.

    Returns:
      `GenerateOutput` with `tokens [batch, steps]`, steps ≤ max_new_tokens (fewer when all
      rows stopped early).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if pad_token_id == cfg.image_context_token_id:
        raise ValueError(f"pad_token_id {pad_token_id} is the image context token")
    if sampling.do_sample and sampling.top_k > cfg.llm.vocab_size:
        raise ValueError(f"top_k {sampling.top_k} is larger than the vocabulary ({cfg.llm.vocab_size} tokens)")
    batch = pad_prompts(input_ids, attention_mask, pad_id=pad_token_id, bucket=prompt_bucket)
    longest = int(batch.lengths.max()) + max_new_tokens
    if longest > cfg.llm.max_position_embeddings:
        raise ValueError(
            f"prompt ({int(batch.lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings {cfg.llm.max_position_embeddings}"
        )
    run = runner or _call
    cross = cfg.arch in ("X", "H")
    row_tiles = cross or (isinstance(pixel_values, np.ndarray | jax.Array) and np.ndim(pixel_values) == 5)
    if row_tiles:
        rows = prepare_row_tiles(cfg, batch, pixel_values, token_image, token_tile, tile_image, tile_valid,
                                 attention_mask)
    else:
        pixel_values = _flat_tiles(pixel_values)
        n_tiles = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
        check_image_token_count(cfg, batch.ids[batch.segment_ids > 0], n_tiles)
    with mesh_context(mesh, rules):
        features = valid = context = None
        if row_tiles:
            context = run(_encode_context, params, batch.ids, rows.pixels, rows.tile_valid, rows.tile_image,
                          rows.token_tile, cfg=cfg)
        elif n_tiles:
            pixels = np.asarray(pixel_values, np.float32)
            bucket = tile_bucket(n_tiles)
            if bucket > n_tiles:
                pixels = np.concatenate([pixels, np.zeros((bucket - n_tiles,) + pixels.shape[1:], np.float32)])
            valid = np.arange(bucket) < n_tiles
            features = run(_encode_images, params, pixels, cfg=cfg)
        tokens, steps, logits = run(
            _generate, params, batch.ids, batch.positions, batch.segment_ids, batch.lengths, features, valid,
            context, rows.token_image if row_tiles else None, rows.token_tile if row_tiles else None,
            rows.new_image if row_tiles else None,
            jax.random.key(seed), np.float32(sampling.temperature), np.int32(sampling.top_k),
            np.float32(sampling.top_p), np.asarray(list(stop_token_ids), np.int32),
            np.asarray(list(suppress_token_ids), np.int32), np.int32(pad_token_id), cfg=cfg,
            max_new_tokens=max_new_tokens, do_sample=sampling.do_sample, return_logits=return_logits,
        )
        steps = int(_fetch(steps))
        tokens = _fetch(tokens)[:, :steps]
        logits = _fetch(logits)[:, :steps] if return_logits else None
    return GenerateOutput(tokens, logits)


def _call(jitted, *args, **static):
    return jitted(*args, **static)


def _fetch(x: jax.Array) -> np.ndarray:
    """A NumPy copy of `x` on this process, gathering the shards other processes hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _flat_tiles(pixel_values):
    """NVLM-D: per-prompt tiles (a list of `[tiles_i, H, W, 3]` arrays or None) → all tiles in order."""
    if not isinstance(pixel_values, list | tuple):
        return pixel_values
    if not any(p is None or np.ndim(p) == 4 for p in pixel_values):
        return pixel_values  # a list of single [H, W, 3] tiles
    rows = [np.asarray(p, np.float32) for p in pixel_values if p is not None and np.shape(p)[0]]
    return np.concatenate(rows) if rows else None


def cut_at_stop(tokens, stop_ids: Sequence[int]) -> tuple[np.ndarray, bool]:
    """The tokens before the first stop token (int [n]), and whether there was one."""
    tokens = np.asarray(tokens).reshape(-1)
    hit = np.flatnonzero(np.isin(tokens, np.asarray(list(stop_ids), tokens.dtype)))
    return (tokens[: hit[0]], True) if hit.size else (tokens, False)
