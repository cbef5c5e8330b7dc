"""Autoregressive generation with a KV cache: one jit-compiled prefill + `lax.while_loop` decode.

Batching: prompts of different lengths are left-padded to a common bucketed length `P`; pad
slots get segment id 0 (never attended) and real tokens positions `0..n-1`, so every row
computes what it would compute alone. The cache holds `P + max_new_tokens` slots; new tokens
of all rows are written at slot `P + step` with their own positions `n_i + step`.

Images: `encode_images` runs once per call (tiles padded to a power-of-two bucket with a
validity mask), and the prefill merges the features at the image context tokens.

Sampling (per step, all in f32): greedy argmax, or temperature → top-k → top-p (nucleus) →
categorical with key `fold_in(PRNGKey(seed), step)`: the same seed gives the same tokens.
A row stops after emitting any stop token (that token is kept; later slots hold `pad_id`); the
loop ends when every row has stopped or `max_new_tokens` were produced.

Shapes are static per (batch, prompt bucket, tile bucket, max_new_tokens, sampling mode), so
repeated calls reuse the compiled programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models.llm import init_cache
from nvlm_jax.models.nvlm import NVLM, check_image_token_count
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules

PROMPT_BUCKET = 64


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """`jax.set_mesh(mesh)` + the logical-axis rules when a mesh is given; nothing otherwise."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen.

    Attributes:
      do_sample: False = greedy (argmax); True = sample from the filtered distribution.
      temperature: logits are divided by it before filtering (> 0).
      top_k: keep the k most likely tokens (0 = no limit).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = SamplingParams()


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    do_sample: bool,
    top_k: int,
    use_top_p: bool,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """Next tokens [batch] int32 from logits [batch, vocab] (f32)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    neg = jnp.finfo(logits.dtype).min
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the mass before it is below top_p (the first one always).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        count = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "do_sample", "top_k", "use_top_p", "return_logits"),
)
def _generate(
    params,
    ids,
    positions,
    segment_ids,
    lengths,
    image_features,
    tile_valid,
    key,
    temperature,
    top_p,
    stop_ids,
    pad_id,
    *,
    cfg: NVLMConfig,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    use_top_p: bool,
    return_logits: bool,
):
    model = NVLM(cfg)
    variables = {"params": params}
    b, p = ids.shape
    cache = init_cache(cfg.llm, b, p + max_new_tokens, jnp.dtype(cfg.dtype))
    _, cache, hidden = model.apply(
        variables, ids, image_features=image_features, tile_valid=tile_valid, positions=positions,
        segment_ids=segment_ids, cache=cache, cache_index=0, return_hidden=True,
    )
    # Only the last position's logits are needed (the full-prompt ones are never computed).
    logits0 = model.apply(variables, hidden[:, -1:], method=lambda m, h: m.llm.logits(h))[:, 0]
    sample = functools.partial(sample_logits, do_sample=do_sample, top_k=top_k, use_top_p=use_top_p,
                               temperature=temperature, top_p=top_p)
    tok = sample(logits0, jax.random.fold_in(key, 0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    all_logits = jnp.zeros((b, max_new_tokens, logits0.shape[-1]), jnp.float32) if return_logits else None
    if return_logits:
        all_logits = all_logits.at[:, 0].set(logits0)
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tok, done, out, all_logits = state
        pos = (lengths + step - 1)[:, None]  # the previous token's position
        logits, cache = model.apply(
            variables, tok[:, None], positions=pos, segment_ids=ones, cache=cache, cache_index=p + step - 1
        )
        logits = logits[:, 0]
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
    pixel_values: np.ndarray | None = None,
    *,
    attention_mask=None,
    max_new_tokens: int = 32,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    prompt_bucket: int = PROMPT_BUCKET,
    return_logits: bool = False,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per prompt.

    Args:
      params: model params (on `mesh` when given).
      cfg: the model config.
      input_ids: `[batch, seq]` ids (with `attention_mask` for padded rows) or a list of 1-D
        prompts of different lengths; image context tokens must already be in place.
      pixel_values: `[tiles, H, W, 3]` float, the tiles of all images of all prompts, in order.
      sampling: greedy or sampling settings; `seed` fixes the sampling noise.
      stop_token_ids: a row ends after producing one of these (e.g. `<|im_end|>`); () = never.
      pad_token_id: written after a row has stopped and used to left-pad prompts.
      mesh / rules: run sharded (params should already be placed on `mesh`).
      return_logits: also return each step's logits (for tests; memory batch·steps·vocab).

    Returns:
      `GenerateOutput` with `tokens [batch, steps]`, steps ≤ max_new_tokens (fewer when all
      rows stopped early).
    """
    if cfg.arch != "D":
        raise ValueError(
            f"generation is implemented for NVLM-D only; NVLM-{cfg.arch} needs per-row tiles and the "
            "tile/image ids of the batch contract (use nvlm_jax.models.nvlm.apply_batch for its logits)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if pad_token_id == cfg.image_context_token_id:
        raise ValueError(f"pad_token_id {pad_token_id} is the image context token")
    batch = pad_prompts(input_ids, attention_mask, pad_id=pad_token_id, bucket=prompt_bucket)
    longest = int(batch.lengths.max()) + max_new_tokens
    if longest > cfg.llm.max_position_embeddings:
        raise ValueError(
            f"prompt ({int(batch.lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings {cfg.llm.max_position_embeddings}"
        )
    real_ids = batch.ids[batch.segment_ids > 0]
    n_tiles = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    check_image_token_count(cfg, real_ids, n_tiles)
    with mesh_context(mesh, rules):
        features = valid = None
        if n_tiles:
            pixels = np.asarray(pixel_values, np.float32)
            bucket = tile_bucket(n_tiles)
            if bucket > n_tiles:
                pixels = np.concatenate([pixels, np.zeros((bucket - n_tiles,) + pixels.shape[1:], np.float32)])
            valid = np.arange(bucket) < n_tiles
            features = _encode_images(params, pixels, cfg=cfg)
        tokens, steps, logits = _generate(
            params, batch.ids, batch.positions, batch.segment_ids, batch.lengths, features, valid,
            jax.random.key(seed), np.float32(sampling.temperature), np.float32(sampling.top_p),
            np.asarray(list(stop_token_ids), np.int32), np.int32(pad_token_id),
            cfg=cfg, max_new_tokens=max_new_tokens, do_sample=sampling.do_sample, top_k=sampling.top_k,
            use_top_p=sampling.top_p < 1.0, return_logits=return_logits,
        )
        steps = int(steps)
        tokens = np.asarray(tokens)[:, :steps]
        logits = np.asarray(logits)[:, :steps] if return_logits else None
    return GenerateOutput(tokens, logits)
