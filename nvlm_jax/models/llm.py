"""Qwen2 / Llama-family decoder: RMSNorm pre-norm, GQA with RoPE, SwiGLU, layers under `lax.scan`.

The KV cache is a dict of stacked arrays (see `init_cache`) that `LLM.__call__` reads and
returns updated (each layer writes its new keys/values into the stack in place; donate the cache
to keep it in place across calls); generation code owns the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from nvlm_jax.config import LLMConfig, LoraConfig
from nvlm_jax.models import matmul
from nvlm_jax.models.attention import MaskSpec, attention
from nvlm_jax.models.cross_attention import GatedCrossAttention
from nvlm_jax.models.linear import Linear
from nvlm_jax.models.mlp import MLP
from nvlm_jax.models.norms import RMSNorm
from nvlm_jax.models.remat import remat_policy
from nvlm_jax.models.stacked import group_leading, stacked_init

Cache = dict[str, jax.Array]


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, seq, head_dim] for rotate-half RoPE (angles in f32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty KV cache: k/v `[layers, batch, max_len, kv_heads, head_dim]`, plus the segment
    ids (0 = empty slot) and positions of what each slot holds, `[batch, max_len]`.

    A 16-bit float `dtype` is stored as its raw bits (`as_bits`: uint16; the decoder reads them
    as its compute dtype, which must then be that dtype). Why: XLA:CPU updates a bf16 buffer
    through an f32 copy of it, and converting a bf16 cache to bits on the way into a program
    (and back on the way out) is a pass over the whole cache each time, every decode step."""
    kv_shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = bits_dtype(dtype)
    return {
        "k": jnp.zeros(kv_shape, dtype),
        "v": jnp.zeros(kv_shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
    }


def write_at(buffer: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """`buffer [batch, len, ...]` with `new [batch, s, ...]` written from sequence index `index`:
    one int for every row, or `[batch]` ints, each row its own (continuous-batching slots)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, index) + (0,) * (buffer.ndim - 2))
    row = lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (i,) + (0,) * (b.ndim - 1))  # noqa: E731
    return jax.vmap(row)(buffer, new, index)


def bits_dtype(dtype) -> jnp.dtype:
    """What `as_bits` turns an array of `dtype` into: uint16 for a 16-bit float, else `dtype`."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) else dtype


def as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array's raw bits (uint16; other dtypes as they are). XLA:CPU runs a bf16
    dynamic-update-slice or slice of a buffer through an f32 copy of the whole buffer (measured:
    the serve engine's bf16 step converted its whole KV cache four times); on the bits the update
    is done in place."""
    bits = bits_dtype(x.dtype)
    return x if bits == x.dtype else jax.lax.bitcast_convert_type(x, bits)


def from_bits(bits: jax.Array, dtype) -> jax.Array:
    """Inverse of `as_bits` for an array of `dtype`."""
    return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def update_slice(buffer: jax.Array, update: jax.Array, start) -> jax.Array:
    """`jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), start)`, in place for
    16-bit floats too (`as_bits`)."""
    bits = jax.lax.dynamic_update_slice(as_bits(buffer), as_bits(update.astype(buffer.dtype)), start)
    return from_bits(bits, buffer.dtype)


def write_at_layer(stack: jax.Array, new: jax.Array, layer: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """`write_at` into layer `layer` of a stacked buffer `[layers, batch, len, ...]`, in place: only
    `new [batch, s, ...]` is written, never the layer's whole slice."""
    dtype = stack.dtype
    stack, new = as_bits(stack), as_bits(new.astype(dtype))
    if jnp.ndim(index) == 0:
        return from_bits(jax.lax.dynamic_update_slice(stack, new[None], (layer, 0, index) + (0,) * (stack.ndim - 3)),
                         dtype)
    # One start per row: a loop of one-row updates, each in place. A vmapped update transposed the
    # whole stack; on a bf16 stack XLA:CPU ran a scatter, or several updates fused together,
    # through an f32 copy of the whole stack (the bf16 server's token rate fell 5x; measured).
    zeros = (0,) * (stack.ndim - 3)
    index = jnp.asarray(index)

    def one_row(r, stack):
        row = jax.lax.dynamic_index_in_dim(new, r, keepdims=True)[None]  # [1, 1, s, ...]
        return jax.lax.dynamic_update_slice(stack, row, (layer, r, index[r]) + zeros)

    return from_bits(jax.lax.fori_loop(0, new.shape[0], one_row, stack), dtype)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; the scan carry is the residual stream `[batch, seq, embed]`."""

    cfg: LLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    lora: LoraConfig = LoraConfig()

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask: MaskSpec, cache_index, layer_index=None):
        """layer_cache: None, or the whole stacked k/v cache `[layers, batch, len, kv_heads, head_dim]`
        with this layer's index `layer_index`; its new keys/values are written there, in place."""
        c = self.cfg
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=c.rms_norm_eps, **dense)
        h = RMSNorm(name="input_layernorm", **norm)(x)
        attn_lora = self.lora.on("llm_attention")
        qkv = dict(use_bias=c.qkv_bias, lora=attn_lora, **dense)
        q = Linear((c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"), name="q_proj", **qkv)(h)
        k = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **qkv)(h)
        v = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **qkv)(h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            stored = layer_cache["k"].dtype
            if stored == jnp.uint16 and jnp.dtype(self.dtype).itemsize != 2:
                raise ValueError(f"a cache of raw 16-bit float bits (uint16) needs a 16-bit compute dtype, "
                                 f"not {jnp.dtype(self.dtype).name}")

            def store(t):  # new keys/values as the cache holds them
                return as_bits(t.astype(self.dtype)) if stored == jnp.uint16 else t.astype(stored)

            new_cache = {name: write_at_layer(layer_cache[name], store(t), layer_index, cache_index)
                         for name, t in (("k", k), ("v", v))}
            # Attention reads this layer's first `batch` rows and `kv_len` columns (the mask's
            # length), straight out of the whole stack: a serving engine's cache is longer and
            # wider than the running requests need.
            size = (1, x.shape[0], mask.kv_segment_ids.shape[-1]) + new_cache["k"].shape[3:]
            k, v = (jax.lax.dynamic_slice(new_cache[name], (layer_index, 0, 0, 0, 0), size)[0] for name in ("k", "v"))
            k, v = ((from_bits(t, self.dtype) if stored == jnp.uint16 else t).astype(self.dtype) for t in (k, v))
        o = attention(q, k, v, mask, scale=c.head_dim**-0.5, implementation=self.attention_impl)
        o = nn.with_logical_constraint(o, ("activation_batch", "activation_length", "activation_heads", None))
        x = x + Linear(c.hidden_size, ("q_heads", "head_dim", "embed"), in_dims=2, name="o_proj", lora=attn_lora,
                       **dense)(o)
        h = RMSNorm(name="post_attention_layernorm", **norm)(x)
        x = x + MLP(c.hidden_size, c.intermediate_size, name="mlp", lora=self.lora.on("llm_mlp"), **dense)(h)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_cache


@struct.dataclass
class CrossAttentionInputs:
    """What the gated cross-attention blocks of NVLM-X/H need inside the decoder.

    params: the blocks' stacked params `[groups, ...]`; k, v: the image memory's keys and values
    per block, `[groups, batch, memory, kv_heads, head_dim]` (computed once per prompt);
    mask: which memory tokens each query token sees.
    """

    params: dict
    k: jax.Array
    v: jax.Array
    mask: MaskSpec


class LLM(nn.Module):
    """The decoder. Call with token ids or with ready input embeddings.

    With `xattn_every`, a gated cross-attention block (given at call time as
    `CrossAttentionInputs`) follows every `xattn_every` decoder layers.
    """

    cfg: LLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    xattn_every: int | None = None
    lora: LoraConfig = LoraConfig()
    # Layer params as separate arrays `layer_{i}` (`NVLMConfig.layer_layout`), read in place.
    # Why: XLA:CPU copies each layer's weights out of a stacked array before its products (and a
    # bf16 stack through f32), which cost more than the products in decode (BUILD_NOTES, "Decoder
    # layout for CPU inference").
    per_layer: bool = False

    def setup(self):
        c = self.cfg
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            self.param_dtype,
        )
        e = c.hidden_size
        dummy_mask = MaskSpec(causal=True)
        example = (jnp.zeros((1, 1, e), self.dtype), None, jnp.ones((1, 1, c.head_dim), self.dtype),
                   jnp.zeros((1, 1, c.head_dim), self.dtype), dummy_mask, 0)
        if self.per_layer:
            if self.xattn_every is not None:
                raise ValueError("per-layer decoder params are for decoders without cross-attention groups")
            self.layers = tuple(
                self.param(f"layer_{i}", lambda rng: self._layer().init(rng, *example)["params"])
                for i in range(c.num_layers))
        else:
            self.layers = self.param("layers", stacked_init(self._layer(), c.num_layers, "layers", *example))
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = Linear(
                c.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(0.02), name="lm_head",
            )

    def _layer(self) -> DecoderLayer:
        return DecoderLayer(self.cfg, self.dtype, self.param_dtype, self.attention_impl, self.lora, parent=None)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[batch, seq] int → [batch, seq, embed] in the compute dtype."""
        x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [batch, seq, embed] → f32 logits [batch, seq, vocab]."""
        if self.cfg.tie_word_embeddings:
            out = matmul.einsum("bse,ve->bsv", hidden, self.embed_tokens, self.dtype, self.dtype)
        else:
            out = self.lm_head(hidden)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))
        return out.astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        xattn: CrossAttentionInputs | None = None,
        return_hidden: bool = False,
    ):
        """Runs the decoder.

        input_ids: [batch, seq] (or `inputs_embeds` [batch, seq, embed]); positions: [batch, seq]
        (default arange, or continuing after `cache_index` with a cache); segment_ids: [batch, seq]
        (0 = padding; default all 1). With `cache`, the new keys/values are written at
        `cache_index` (an int, or [batch] ints: each row its own) and attention covers the cache's
        columns that its `segment_ids` / `positions` `[batch, kv_len]` describe: its k/v stacks
        `[layers, >= batch, >= kv_len, ...]` may be larger (a serving engine's slots and context),
        and are then read and written in place, never copied whole.

        Returns (logits [batch, seq, vocab] f32, new cache or None), and the final-normed hidden
        state as a third element when `return_hidden`.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, s = x.shape[:2]
        if positions is None:
            start = jnp.reshape(cache_index, (-1, 1))  # [1, 1] or [batch, 1]
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + start, (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        layer_cache = None
        if cache is None:
            mask = MaskSpec(causal=True, causal_by_index=True, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids, q_positions=positions, kv_positions=positions)
        else:
            kv_seg = write_at(cache["segment_ids"], segment_ids.astype(jnp.int32), cache_index)
            kv_pos = write_at(cache["positions"], positions.astype(jnp.int32), cache_index)
            mask = MaskSpec(causal=True, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
                            q_positions=positions, kv_positions=kv_pos)
            layer_cache = {"k": cache["k"], "v": cache["v"]}
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        x, new_layer_cache = self._run_layers(x, layer_cache, cos, sin, mask, cache_index, xattn)
        hidden = self.norm(x)
        logits = self.logits(hidden)
        new_cache = None
        if cache is not None:
            new_cache = dict(new_layer_cache, segment_ids=kv_seg, positions=kv_pos)
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache

    def _run_layers(self, x, layer_cache, cos, sin, mask, cache_index, xattn):
        layer = self._layer()
        # Adapter dropout: one key per layer, only when the caller passes a "dropout" RNG.
        keys = None
        if self.lora.rank and self.lora.dropout and self.has_rng("dropout"):
            keys = jax.random.split(self.make_rng("dropout"), self.cfg.num_layers)

        def one_layer(x, xs):
            params, lcache, key = xs
            rngs = None if key is None else {"dropout": key}
            return layer.apply({"params": params}, x, lcache, cos, sin, mask, cache_index, rngs=rngs)

        if self.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=remat_policy(self.remat), prevent_cse=False)
        if self.xattn_every is None and xattn is not None:
            raise ValueError("cross-attention inputs given to a decoder without xattn_every")
        if self.xattn_every is not None:
            if xattn is None:
                raise ValueError("this decoder interleaves cross-attention blocks: pass `xattn`")
            every, groups = self.xattn_every, self.cfg.num_layers // self.xattn_every
            block = GatedCrossAttention(self.cfg, self.dtype, self.param_dtype, self.attention_impl, parent=None)
            group_xs = (group_leading(self.layers, groups), None if keys is None else group_leading(keys, groups),
                        xattn.params, xattn.k, xattn.v)  # [groups, ...] each

        # Decoding: the stacked cache rides in the scans' carry and each layer writes only its new
        # keys/values into it, in place. As scan inputs/outputs, every step rebuilt the whole cache
        # (a fresh zeroed stack plus copies: ~4 passes over it per step; BUILD_NOTES). It is carried
        # as raw bits (`as_bits`): a loop carrying a bf16 cache copied it whole to update its bits.
        dtypes = {} if layer_cache is None else {name: c.dtype for name, c in layer_cache.items()}

        def bits(cache):
            return {name: as_bits(c) for name, c in cache.items()}

        def unbits(cache):
            return {name: from_bits(c, dtypes[name]) for name, c in cache.items()}

        def in_carry(carry, xs):
            x, cache = carry
            i, params, key = xs
            rngs = None if key is None else {"dropout": key}
            x, cache = layer.apply({"params": params}, x, unbits(cache), cos, sin, mask, cache_index, i, rngs=rngs)
            return (x, bits(cache)), None

        if layer_cache is not None and self.xattn_every is not None:
            def group_in_carry(carry, xs):
                g, params, gkeys, block_params, k, v = xs
                layer_xs = (g * every + jnp.arange(every), params, gkeys)
                (x, cache), _ = jax.lax.scan(in_carry, carry, layer_xs)
                return (block.apply({"params": block_params}, x, k, v, xattn.mask), cache), None

            (x, cache), _ = jax.lax.scan(group_in_carry, (x, bits(layer_cache)), (jnp.arange(groups), *group_xs))
            return x, unbits(cache)
        if layer_cache is not None:
            if self.per_layer:
                # Unrolled: a switch inside the scan would copy the whole cache (its operand) per layer.
                carry = (x, bits(layer_cache))
                for i, params in enumerate(self.layers):
                    carry, _ = in_carry(carry, (i, params, None if keys is None else keys[i]))
                return carry[0], unbits(carry[1])
            index = jnp.arange(self.cfg.num_layers)
            (x, cache), _ = jax.lax.scan(in_carry, (x, bits(layer_cache)), (index, self.layers, keys))
            return x, unbits(cache)
        # No cache (training, a plain forward).
        if self.per_layer:
            # Each scan step switches to its layer's function, which reads that layer's own weight
            # arrays in place (no slice of a stack to copy).
            branches = [lambda x, key, p=params: one_layer(x, (p, None, key)) for params in self.layers]
            switch_layer = lambda x, xs: jax.lax.switch(xs[0], branches, x, xs[1])  # noqa: E731
            return jax.lax.scan(switch_layer, x, (jnp.arange(len(self.layers)), keys))
        if self.xattn_every is None:
            return jax.lax.scan(one_layer, x, (self.layers, None, keys))

        def one_group(x, xs):
            params, gkeys, block_params, k, v = xs
            x, _ = jax.lax.scan(one_layer, x, (params, None, gkeys))
            return block.apply({"params": block_params}, x, k, v, xattn.mask), None

        x, _ = jax.lax.scan(one_group, x, group_xs)
        return x, None
