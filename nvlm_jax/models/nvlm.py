"""The NVLM model: vision encoder → pixel shuffle → projector → decoder.

NVLM-D places each tile's projected tokens at the image-context tokens of the text, in order
(images in `pixel_values` order, tiles within an image as tiled, thumbnail last).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models.intern_vit import InternViT
from nvlm_jax.models.llm import LLM, Cache
from nvlm_jax.models.projector import Projector, pixel_shuffle
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings


class NVLM(nn.Module):
    cfg: NVLMConfig

    def setup(self):
        c = self.cfg
        if c.arch != "D":
            raise ValueError(f"NVLM arch {c.arch!r} is not available in this module yet; only 'D' is")
        common = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.vision = InternViT(c.vision, attention_impl=c.attention_impl, remat=c.remat_policy, **common)
        self.projector = Projector(c.projector, **common)
        self.llm = LLM(c.llm, attention_impl=c.attention_impl, remat=c.remat_policy, **common)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """[tiles, H, W, 3] → projected image tokens [tiles, tokens_per_tile, llm_hidden]."""
        feats = self.vision(pixel_values)[:, 1:]  # drop CLS
        feats = pixel_shuffle(feats, self.cfg.shuffle_scale, self.cfg.ps_version)
        return self.projector(feats)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        tile_valid: jax.Array | None = None,
        *,
        image_features: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
    ):
        """input_ids: [batch, seq] holding `image_context_token_id` where image tokens go;
        pixel_values: [tiles, H, W, 3], the tiles of all images of the batch in order, or
          [batch, tiles, H, W, 3] with each row's tiles (training batches: rows shard over data);
        tile_valid: [tiles] or [batch, tiles] bool, False for padding tiles of a static bucket;
        image_features: precomputed `encode_images` output (instead of pixel_values).
        Returns what `LLM.__call__` returns (logits [batch, seq, vocab] f32, cache[, hidden]).
        """
        embeds = self.llm.embed(input_ids)
        if image_features is None and pixel_values is not None:
            if pixel_values.ndim == 5:
                b, t = pixel_values.shape[:2]
                image_features = self.encode_images(pixel_values.reshape(b * t, *pixel_values.shape[2:]))
                image_features = image_features.reshape(b, t, *image_features.shape[1:])
            else:
                image_features = self.encode_images(pixel_values)
        if image_features is not None:
            if not isinstance(input_ids, jax.core.Tracer) and not isinstance(tile_valid, jax.core.Tracer):
                # Eager calls can check the count; jit callers check on the host beforehand.
                rows = image_features.ndim == 4
                for ids, valid in zip(input_ids if rows else [input_ids],
                                      (tile_valid if tile_valid is not None else [None] * len(input_ids))
                                      if rows else [tile_valid], strict=True):
                    n = image_features.shape[-3] if valid is None else int(np.sum(np.asarray(valid)))
                    check_image_token_count(self.cfg, ids, n)
            embeds = merge_image_tokens(
                embeds, input_ids, image_features, tile_valid, self.cfg.image_context_token_id
            )
        return self.llm(
            inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache,
            cache_index=cache_index, return_hidden=return_hidden,
        )


def merge_image_tokens(
    embeds: jax.Array,
    input_ids: jax.Array,
    image_features: jax.Array,
    tile_valid: jax.Array | None,
    context_token_id: int,
) -> jax.Array:
    """Replaces the embeddings at context tokens by the valid tiles' features, in order.

    embeds: [batch, seq, E]; image_features: [tiles, tokens, E]. The k-th context token of the
    flattened batch gets token k of the valid tiles' features (padding tiles are skipped).
    With per-row features [batch, tiles, tokens, E] (and tile_valid [batch, tiles]) the same
    happens within each row. Counts are checked on the host by `check_image_token_count`; here,
    a surplus of context tokens would reuse the last feature, which is why callers must check.
    """
    if image_features.ndim == 4:
        valid = tile_valid if tile_valid is not None else jnp.ones(image_features.shape[:2], bool)
        one_row = lambda e, i, f, v: merge_image_tokens(e[None], i[None], f, v, context_token_id)[0]  # noqa: E731
        return jax.vmap(one_row)(embeds, input_ids, image_features, valid)
    b, s, e = embeds.shape
    t, n, _ = image_features.shape
    if tile_valid is not None:
        # Stable sort puts valid tiles first while keeping their order.
        order = jnp.argsort(jnp.logical_not(tile_valid).astype(jnp.int32), stable=True)
        image_features = image_features[order]
    flat = image_features.reshape(t * n, e).astype(embeds.dtype)
    is_img = (input_ids == context_token_id).reshape(b * s)
    index = jnp.clip(jnp.cumsum(is_img) - 1, 0, t * n - 1)
    gathered = jnp.take(flat, index, axis=0).reshape(b, s, e)
    return jnp.where(is_img.reshape(b, s, 1), gathered, embeds)


def check_image_token_count(cfg: NVLMConfig, input_ids, num_valid_tiles: int) -> None:
    """Raises ValueError unless the ids hold exactly `num_valid_tiles · tokens_per_tile`
    context tokens (the reference silently truncates instead)."""
    found = int(np.sum(np.asarray(input_ids) == cfg.image_context_token_id))
    expected = num_valid_tiles * cfg.num_image_tokens
    if found != expected:
        raise ValueError(
            f"input_ids hold {found} image context tokens (id {cfg.image_context_token_id}) but "
            f"{num_valid_tiles} tiles x {cfg.num_image_tokens} tokens = {expected} image tokens were given"
        )


def _dummy_inputs(cfg: NVLMConfig):
    n = cfg.num_image_tokens
    ids = jnp.full((1, n + 2), 0, jnp.int32).at[0, 1 : n + 1].set(cfg.image_context_token_id)
    size = cfg.vision.image_size
    pixels = jnp.zeros((1, size, size, cfg.vision.num_channels), jnp.float32)
    return ids, pixels


def abstract_params(cfg: NVLMConfig):
    """The boxed (logically annotated) parameter shapes, without allocating anything."""
    ids, pixels = _dummy_inputs(cfg)
    return jax.eval_shape(lambda: NVLM(cfg).init(jax.random.key(0), ids, pixels)["params"])


def init_params(
    cfg: NVLMConfig,
    rng: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
):
    """Freshly initialised params as a plain nested dict, sharded over `mesh` when given."""
    ids, pixels = _dummy_inputs(cfg)

    def init(key):
        return nn.meta.unbox(NVLM(cfg).init(key, ids, pixels)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = tree_shardings(abstract_params(cfg), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def shard_params(params, cfg: NVLMConfig, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Places an existing params dict onto `mesh` by the logical-axis rules."""
    return jax.device_put(params, tree_shardings(abstract_params(cfg), mesh, rules))


def apply_batch(params, cfg: NVLMConfig, batch) -> jax.Array:
    """Logits [B, S, vocab] (f32) for a training batch (see `nvlm_jax.data.batch`), any arch."""
    return NVLM(cfg).apply(
        {"params": params},
        batch["input_ids"],
        batch["pixel_values"],
        batch["tile_valid"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )[0]
