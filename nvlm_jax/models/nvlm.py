"""The NVLM model: vision encoder → pixel shuffle → projector → decoder, for all three archs.

- NVLM-D places each tile's projected tokens at the image-context tokens of the text, in order
  (images in `pixel_values` order, tiles within an image as tiled, thumbnail last).
- NVLM-X keeps image tokens out of the decoder: every tile (thumbnail included) is memory for the
  gated cross-attention blocks that follow every `xattn_every` decoder layers.
- NVLM-H puts each image's thumbnail tokens in the decoder (like D) and reaches the regular tiles
  through cross-attention; the memory of tile k is the embedding of its `<tile_k>` tag tokens
  followed by its projected tokens.

X/H need per-row tiles (`pixel_values [batch, tiles, H, W, 3]`) and the tile/image ids of the
batch contract (`nvlm_jax.data.batch`): `tile_image`, `token_image`, `token_tile`. A row's
thumbnail is the last valid tile slot of each image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import quantize
from nvlm_jax.models.cross_attention import GatedCrossAttention, cross_attention_mask
from nvlm_jax.models.intern_vit import InternViT
from nvlm_jax.models.llm import LLM, Cache, CrossAttentionInputs
from nvlm_jax.models.projector import Projector, pixel_shuffle
from nvlm_jax.models.stacked import stacked_init
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings


@struct.dataclass
class ImageContext:
    """Everything a prompt's images contribute, computed once per prompt (reused when decoding).

    decoder_features [b, T, n, E] and decoder_valid [b, T]: tiles whose tokens replace the
    context tokens (D: all tiles; H: thumbnails; X: none). memory_k/v [groups, b, M, kv_heads, d],
    memory_image/memory_tile [b, M]: the cross-attention memory (X/H).
    """

    decoder_features: jax.Array | None = None
    decoder_valid: jax.Array | None = None
    memory_k: jax.Array | None = None
    memory_v: jax.Array | None = None
    memory_image: jax.Array | None = None
    memory_tile: jax.Array | None = None

    def memory_only(self) -> ImageContext:
        """For decode steps after the prefill: new tokens hold no image context tokens."""
        return self.replace(decoder_features=None, decoder_valid=None)


def thumbnail_slots(tile_valid: jax.Array, tile_image: jax.Array) -> jax.Array:
    """[b, T] bool: the last valid slot of each image (its thumbnail, or its only tile)."""
    next_image = jnp.concatenate([tile_image[:, 1:], jnp.full_like(tile_image[:, :1], -1)], axis=1)
    next_valid = jnp.concatenate([tile_valid[:, 1:], jnp.zeros_like(tile_valid[:, :1])], axis=1)
    return tile_valid & ((next_image != tile_image) | ~next_valid)


class NVLM(nn.Module):
    cfg: NVLMConfig

    # Quantized Linear kernels (`cfg.quantize`) are declared by the model itself: every init and
    # apply runs inside `quantized_init`, so the stacked layers' param shapes (checked by flax
    # against their init on every apply) are the quantized ones.
    @nn.nowrap
    def init(self, *args, **kwargs):
        with quantize.quantized_init(self.cfg.quantize):
            return super().init(*args, **kwargs)

    @nn.nowrap
    def apply(self, *args, **kwargs):
        with quantize.quantized_init(self.cfg.quantize):
            return super().apply(*args, **kwargs)

    def setup(self):
        c = self.cfg
        common = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.vision = InternViT(c.vision, attention_impl=c.attention_impl, remat=c.remat_policy,
                                lora=c.lora.on("vision"), **common)
        self.projector = Projector(c.projector, lora=c.lora.on("projector"), **common)
        xattn_every = c.xattn_every if c.arch in ("X", "H") else None
        self.llm = LLM(c.llm, attention_impl=c.attention_impl, remat=c.remat_policy, xattn_every=xattn_every,
                       lora=c.lora, per_layer=c.layer_layout == "per_layer", **common)
        if xattn_every:
            e = c.llm.hidden_size
            block = GatedCrossAttention(c.llm, attention_impl=c.attention_impl, parent=None, **common)
            dummy = jnp.zeros((1, 1, e), common["dtype"])
            self.xattn = self.param(
                "xattn",
                stacked_init(block, c.llm.num_layers // xattn_every, "layer_groups", dummy, dummy,
                             method=GatedCrossAttention.init_all),
            )

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """[tiles, H, W, 3] → projected image tokens [tiles, tokens_per_tile, llm_hidden]."""
        feats = self.vision(pixel_values)[:, 1:]  # drop CLS
        feats = pixel_shuffle(feats, self.cfg.shuffle_scale, self.cfg.ps_version)
        return self.projector(feats)

    def encode(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array,
        tile_valid: jax.Array,
        tile_image: jax.Array | None = None,
        token_tile: jax.Array | None = None,
        *,
        features: jax.Array | None = None,
    ) -> ImageContext:
        """The ImageContext of per-row tiles `pixel_values [b, T, H, W, 3]` for a prompt, or of
        their already projected tokens `features [b, T, n, E]` (then pixel_values is ignored)."""
        c = self.cfg
        if features is None:
            b, t = pixel_values.shape[:2]
            feats = self.encode_images(pixel_values.reshape(b * t, *pixel_values.shape[2:]))
            feats = feats.reshape(b, t, *feats.shape[1:])  # [b, T, n, E]
        else:
            feats = features
            b, t = feats.shape[:2]
        if c.arch == "D":
            return ImageContext(decoder_features=feats, decoder_valid=tile_valid)
        if tile_image is None or token_tile is None:
            raise ValueError(f"NVLM-{c.arch} needs tile_image and token_tile to build its image memory")
        n, e = feats.shape[2:]
        slots = jnp.arange(t)
        if c.arch == "X":
            memory = feats.reshape(b, t * n, e)
            slot_image = jnp.where(tile_valid, tile_image, -1)
            memory_image = jnp.repeat(slot_image, n, axis=1)
            memory_tile = jnp.broadcast_to(jnp.repeat(slots, n), (b, t * n))
            context = ImageContext()
        else:  # H: thumbnails into the decoder, regular tiles (after their tags) into the memory
            thumbs = thumbnail_slots(tile_valid, tile_image)
            tags, tag_present = self._tag_embeddings(input_ids, token_tile, t)  # [b, T, L, E]
            memory = jnp.concatenate([tags, feats.astype(tags.dtype)], axis=2)
            per_slot = tags.shape[2] + n
            memory = memory.reshape(b, t * per_slot, e)
            slot_image = jnp.where(tile_valid & ~thumbs, tile_image, -1)[:, :, None]
            memory_image = jnp.concatenate(
                [jnp.where(tag_present, slot_image, -1), jnp.broadcast_to(slot_image, (b, t, n))], axis=2
            ).reshape(b, t * per_slot)
            memory_tile = jnp.broadcast_to(jnp.repeat(slots, per_slot), (b, t * per_slot))
            context = ImageContext(decoder_features=feats, decoder_valid=thumbs)
        block = GatedCrossAttention(c.llm, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), c.attention_impl,
                                    parent=None)
        k, v = jax.vmap(
            lambda p: block.apply({"params": p}, memory, method=GatedCrossAttention.memory_kv)
        )(self.xattn)
        return context.replace(memory_k=k, memory_v=v, memory_image=memory_image, memory_tile=memory_tile)

    def _tag_embeddings(self, input_ids, token_tile, num_slots):
        """Embeddings of each slot's tile-tag tokens, [b, T, max_tag_tokens, E], and presence."""
        limit = self.cfg.max_tag_tokens
        embeds = self.llm.embed(input_ids)
        in_slot = token_tile[:, :, None] == jnp.arange(num_slots)  # [b, s, T]
        rank = jnp.sum((jnp.cumsum(in_slot, axis=1) - 1) * in_slot, axis=2)  # [b, s]
        select = in_slot[:, :, :, None] & (rank[:, :, None, None] == jnp.arange(limit))  # [b, s, T, L]
        tags = jnp.einsum("bstl,bse->btle", select.astype(embeds.dtype), embeds)
        return tags, select.any(axis=1)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        tile_valid: jax.Array | None = None,
        *,
        tile_image: jax.Array | None = None,
        token_image: jax.Array | None = None,
        token_tile: jax.Array | None = None,
        image_features: jax.Array | None = None,
        image_context: ImageContext | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
    ):
        """input_ids: [batch, seq] holding `image_context_token_id` where image tokens go (D, H);
        pixel_values: [tiles, H, W, 3], the tiles of all images of the batch in order (D only), or
          [batch, tiles, H, W, 3] with each row's tiles (training batches; required for X/H);
        tile_valid: [tiles] or [batch, tiles] bool, False for padding tiles of a static bucket;
        tile_image / token_image / token_tile: the X/H ids of `nvlm_jax.data.batch`;
        image_features: precomputed `encode_images` output (D, instead of pixel_values);
        image_context: precomputed `encode` output (any arch; reused across decode steps).
        Returns what `LLM.__call__` returns (logits [batch, seq, vocab] f32, cache[, hidden]).
        """
        c = self.cfg
        embeds = self.llm.embed(input_ids)
        if image_context is None and pixel_values is not None:
            if pixel_values.ndim == 5:
                valid = tile_valid if tile_valid is not None else jnp.ones(pixel_values.shape[:2], bool)
                image_context = self.encode(input_ids, pixel_values, valid, tile_image, token_tile)
            elif c.arch == "D":
                image_features = self.encode_images(pixel_values)
            else:
                raise ValueError(f"NVLM-{c.arch} takes per-row pixel_values [batch, tiles, H, W, 3]")
        features, valid = image_features, tile_valid
        if image_context is not None:
            features, valid = image_context.decoder_features, image_context.decoder_valid
        if features is not None:
            if not isinstance(input_ids, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer):
                # Eager calls can check the count; jit callers check on the host beforehand.
                rows = features.ndim == 4
                for ids, row_valid in zip(input_ids if rows else [input_ids],
                                          (valid if valid is not None else [None] * len(input_ids))
                                          if rows else [valid], strict=True):
                    n = features.shape[-3] if row_valid is None else int(np.sum(np.asarray(row_valid)))
                    check_image_token_count(c, ids, n)
            embeds = merge_image_tokens(embeds, input_ids, features, valid, c.image_context_token_id)
        xattn = None
        if c.arch in ("X", "H"):
            if image_context is None or token_image is None or token_tile is None:
                raise ValueError(f"NVLM-{c.arch} needs images (or image_context), token_image and token_tile")
            mask = cross_attention_mask(token_image, token_tile, image_context.memory_image,
                                        image_context.memory_tile)
            xattn = CrossAttentionInputs(self.xattn, image_context.memory_k, image_context.memory_v, mask)
        return self.llm(
            inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache,
            cache_index=cache_index, xattn=xattn, return_hidden=return_hidden,
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
    """One row with one single-tile image: its tile is its thumbnail, so D and H put it in the
    decoder and X in the memory."""
    n = cfg.num_image_tokens
    if cfg.arch == "X":
        ids = jnp.zeros((1, 4), jnp.int32)
    else:
        ids = jnp.full((1, n + 2), 0, jnp.int32).at[0, 1 : n + 1].set(cfg.image_context_token_id)
    size = cfg.vision.image_size
    pixels = jnp.zeros((1, 1, size, size, cfg.vision.num_channels), jnp.float32)
    s = ids.shape[1]
    kwargs = dict(tile_valid=jnp.ones((1, 1), bool), tile_image=jnp.zeros((1, 1), jnp.int32),
                  token_image=jnp.zeros((1, s), jnp.int32), token_tile=jnp.full((1, s), -1, jnp.int32))
    return ids, pixels, kwargs


def _init(cfg: NVLMConfig, key):
    ids, pixels, kwargs = _dummy_inputs(cfg)
    return NVLM(cfg).init(key, ids, pixels, **kwargs)["params"]


def abstract_params(cfg: NVLMConfig):
    """The boxed (logically annotated) parameter shapes, without allocating anything (quantized
    Linear kernels when `cfg.quantize`)."""
    return jax.eval_shape(lambda: _init(cfg, jax.random.key(0)))


def init_params(
    cfg: NVLMConfig,
    rng: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    select: Callable[[Any], Any] | None = None,
):
    """Freshly initialised params as a plain nested dict, sharded over `mesh` when given.

    `select` (a tree -> subtree function, e.g. `lora.adapters`) returns only part of them; the
    rest of the init is traced but dropped by XLA, so it costs the part's memory only."""
    if mesh is None:
        return _jitted_init(cfg, None, rules, select)(rng)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _jitted_init(cfg, mesh, rules, select)(rng)


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: NVLMConfig, mesh: jax.sharding.Mesh | None, rules: LogicalRules, select):
    """The jitted initialiser, compiled once per configuration (a LoRA run re-creates its frozen
    base from it on every resume and load)."""
    pick = select or (lambda tree: tree)

    def init(key):
        return pick(nn.meta.unbox(_init(cfg, key)))

    if mesh is None:
        return jax.jit(init)
    return jax.jit(init, out_shardings=pick(tree_shardings(abstract_params(cfg), mesh, rules)))


def check_mesh(cfg: NVLMConfig, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
    """Raises a ValueError explaining why `cfg` cannot be laid out on `mesh`, if it cannot.

    Head counts are the usual culprits, so they get a specific hint before the full list of
    parameters that do not divide (Qwen2-72B has 8 KV heads; the 72B ViT has 25 real heads,
    padded to 32 by its 7 dummy heads).
    """
    hints = []
    tensor = mesh.shape.get("tensor", 1)
    if cfg.llm.num_kv_heads % tensor:
        ok = [d for d in range(1, cfg.llm.num_kv_heads + 1) if cfg.llm.num_kv_heads % d == 0]
        hints.append(f"the LLM has {cfg.llm.num_kv_heads} KV heads: a tensor axis of {tensor} cannot split them "
                     f"(use tensor in {ok})")
    if cfg.vision.total_heads % tensor:
        v = cfg.vision
        hints.append(f"the ViT has {v.num_heads} heads + {v.num_dummy_heads} dummy = {v.total_heads}: a tensor "
                     f"axis of {tensor} cannot split them (pad with num_dummy_heads, e.g. 7 for 32 heads, or "
                     "replicate the ViT over 'tensor' with rules that map vit_heads/vit_mlp to None)")
    try:
        tree_shardings(abstract_params(cfg), mesh, rules)
    except ValueError as e:
        raise ValueError("; ".join(hints + [str(e)])) from None
    if hints:
        raise ValueError("; ".join(hints))


def shard_params(params, cfg: NVLMConfig, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Places an existing params dict onto `mesh` by the logical-axis rules."""
    return jax.device_put(params, tree_shardings(abstract_params(cfg), mesh, rules))


def apply_batch(params, cfg: NVLMConfig, batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits [B, S, vocab] (f32) for a training batch (see `nvlm_jax.data.batch`), any arch.
    `dropout_rng` turns on the LoRA adapters' dropout (training only)."""
    return NVLM(cfg).apply(
        {"params": params},
        batch["input_ids"],
        batch["pixel_values"],
        batch["tile_valid"],
        tile_image=batch["tile_image"],
        token_image=batch["token_image"],
        token_tile=batch["token_tile"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )[0]
