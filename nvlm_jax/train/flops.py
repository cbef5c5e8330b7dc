"""Analytic FLOP counts of a training batch: ViT + projector + decoder (+ cross-attention) matmuls
and attention, forward and backward, for MFU.

Conventions:
  - A matmul `[m, k] x [k, n]` costs `2·m·k·n` FLOPs; elementwise work (norms, softmax, GELU,
    RoPE, the loss) is not counted (it is small next to the matmuls at real sizes).
  - Counts are of what the implementation computes for the batch's static shapes: every tile
    slot runs through the ViT (padding slots too), every decoder position is computed, and
    attention counts the query·key pairs the XLA path evaluates (`attention.QUERY_CHUNK`: a
    sequence up to one chunk computes the full square; longer causal sequences skip the key
    blocks after each query chunk).
  - Training: a weight matmul costs 1× forward, +1× for the gradient w.r.t. its input when a
    trainable parameter sits below it, +1× for the gradient w.r.t. its weight when it trains.
    Attention has no weights; its backward costs 2× its forward wherever a gradient passes.
    So a frozen ViT under nothing trainable costs its forward only, and the ViT's patch
    embedding never computes a gradient for the pixels. Decoder layers and cross-attention
    blocks run under `lax.scan`: once anything trains, every layer computes its input gradient
    (the scan body is the same for all layers), also below the lowest trainable one.
"""

from __future__ import annotations

import dataclasses

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models.attention import QUERY_CHUNK


@dataclasses.dataclass(frozen=True)
class ComponentFlops:
    """Forward FLOPs of one component: weight matmuls (`linear`, of which `first_linear` is the
    part reading the component's input) and attention."""

    linear: float = 0.0
    attention: float = 0.0
    first_linear: float = 0.0

    @property
    def forward(self) -> float:
        return self.linear + self.attention

    def training(self, inner_grad: float, input_grad: float, trained: bool) -> float:
        """Forward + backward FLOPs.

        inner_grad: fraction (0..1) of the component that a gradient passes through (input
          gradients of all matmuls but the first, attention backward);
        input_grad: fraction (0..1) of it whose input needs the gradient (first matmuls);
        trained: the component's weights train (weight gradients of every matmul).
        """
        return (
            self.forward
            + trained * self.linear
            + inner_grad * (self.linear - self.first_linear + 2 * self.attention)
            + input_grad * self.first_linear
        )


def attention_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """Query·key pairs the XLA attention path evaluates for one (batch row, head)."""
    if q_len <= QUERY_CHUNK or not causal:
        return q_len * kv_len
    total = 0
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(q_len, start + QUERY_CHUNK)
        total += (stop - start) * (stop + kv_len - q_len)
    return total


def vision_flops(cfg: NVLMConfig, tiles: int) -> ComponentFlops:
    """InternViT forward over `tiles` tiles (the layers up to `select_layer`); the first matmul
    is the patch embedding."""
    v = cfg.vision
    n, c, width = v.num_positions, v.hidden_size, v.total_heads * v.head_dim
    per_layer = 2 * n * (c * 3 * width + width * c + 2 * c * v.intermediate_size)
    patch_embed = 2 * v.grid_size**2 * v.patch_size**2 * v.num_channels * c
    attn = v.layers_used * 4 * attention_pairs(n, n, causal=False) * width
    return ComponentFlops(tiles * (patch_embed + v.layers_used * per_layer), tiles * attn, tiles * patch_embed)


def projector_flops(cfg: NVLMConfig, tiles: int) -> ComponentFlops:
    """Projector forward over `tiles` tiles (`num_image_tokens` tokens each)."""
    p, n = cfg.projector, cfg.num_image_tokens
    if p.num_layers == 1:
        first = total = 2 * n * p.input_size * p.output_size
    else:
        first = 2 * n * p.input_size * p.hidden_size
        total = first + 2 * n * p.hidden_size * p.output_size
    return ComponentFlops(tiles * total, 0.0, tiles * first)


def decoder_flops(cfg: NVLMConfig, batch: int, seq_len: int) -> ComponentFlops:
    """The decoder's self-attention layers (without the lm_head) over `batch` × `seq_len` tokens."""
    m = cfg.llm
    e, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    per_token_layer = 2 * (e * q + 2 * e * kv + q * e + 3 * e * m.intermediate_size)
    linear = batch * seq_len * m.num_layers * per_token_layer
    attn = batch * m.num_layers * 4 * attention_pairs(seq_len, seq_len, causal=True) * q
    return ComponentFlops(linear, attn)


def head_flops(cfg: NVLMConfig, batch: int, seq_len: int) -> ComponentFlops:
    """The lm_head (hidden → vocab logits) at every position."""
    head = 2.0 * batch * seq_len * cfg.llm.hidden_size * cfg.llm.vocab_size
    return ComponentFlops(head, 0.0, head)


def memory_tokens(cfg: NVLMConfig, tile_slots: int) -> int:
    """Cross-attention memory length per row: X reads every tile's tokens; H every tile's
    `max_tag_tokens` tag slots + tokens; D has no cross-attention."""
    if cfg.arch == "X":
        return tile_slots * cfg.num_image_tokens
    if cfg.arch == "H":
        return tile_slots * (cfg.num_image_tokens + cfg.max_tag_tokens)
    return 0


def xattn_flops(cfg: NVLMConfig, batch: int, seq_len: int, tile_slots: int) -> tuple[ComponentFlops, ComponentFlops]:
    """Gated cross-attention blocks (X/H): (text side: q/o, FFN, attention; memory side: k/v)."""
    if cfg.arch == "D" or not cfg.xattn_every:
        return ComponentFlops(), ComponentFlops()
    m = cfg.llm
    e, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    blocks = m.num_layers // cfg.xattn_every
    mem = memory_tokens(cfg, tile_slots)
    text = blocks * batch * 2 * seq_len * (2 * e * q + 3 * e * m.intermediate_size)
    reads_x = blocks * batch * 2 * seq_len * (e * q + 2 * e * m.intermediate_size)  # q, gate, up read the text
    attn = blocks * batch * 4 * attention_pairs(seq_len, mem, causal=False) * q
    memory = blocks * batch * 2 * mem * 2 * e * kv
    return ComponentFlops(text, attn, reads_x), ComponentFlops(memory, 0.0, memory)


@dataclasses.dataclass(frozen=True)
class BatchFlops:
    """FLOPs of one batch by component; `forward` and `training` are totals."""

    cfg: NVLMConfig
    vision: ComponentFlops
    projector: ComponentFlops
    decoder: ComponentFlops
    head: ComponentFlops
    xattn_text: ComponentFlops
    xattn_memory: ComponentFlops
    trained: frozenset[str]

    @property
    def components(self) -> tuple[ComponentFlops, ...]:
        return (self.vision, self.projector, self.decoder, self.head, self.xattn_text, self.xattn_memory)

    @property
    def forward(self) -> float:
        return sum(c.forward for c in self.components)

    @property
    def training(self) -> float:
        t = self.trained
        vit, proj, llm, xa = ("vision" in t), ("projector" in t), ("llm" in t), ("xattn" in t)
        below_decoder = vit or proj  # image features feed the decoder (D, H) and the memory (X, H)
        # The decoder layers and blocks run under `lax.scan`, whose uniform body computes the
        # input gradient of every layer as soon as anything trains (even below the lowest
        # trainable one, e.g. the layers under the first cross-attention block in X pretraining).
        grad = 1.0 if t else 0.0
        memory_grad = below_decoder or (self.cfg.arch == "H" and llm)  # H's memory holds tag embeddings
        return (
            self.vision.training(inner_grad=vit, input_grad=False, trained=vit)
            + self.projector.training(inner_grad=vit or proj, input_grad=vit, trained=proj)
            + self.decoder.training(inner_grad=grad, input_grad=grad, trained=llm)
            + self.head.training(inner_grad=0.0, input_grad=bool(t), trained=llm)
            + self.xattn_text.training(inner_grad=grad, input_grad=grad, trained=xa)
            + self.xattn_memory.training(inner_grad=0.0, input_grad=memory_grad, trained=xa)
        )


def batch_flops(
    cfg: NVLMConfig, batch: int, seq_len: int, tile_slots: int, trained: frozenset[str] = frozenset()
) -> BatchFlops:
    """FLOPs for a batch of `batch` rows × `seq_len` tokens × `tile_slots` tile slots per row,
    with the top-level param subtrees in `trained` (see `freeze.trained_subtrees`) training."""
    tiles = batch * tile_slots
    xt, xm = xattn_flops(cfg, batch, seq_len, tile_slots)
    return BatchFlops(
        cfg=cfg,
        vision=vision_flops(cfg, tiles),
        projector=projector_flops(cfg, tiles),
        decoder=decoder_flops(cfg, batch, seq_len),
        head=head_flops(cfg, batch, seq_len),
        xattn_text=xt,
        xattn_memory=xm,
        trained=frozenset(trained),
    )
