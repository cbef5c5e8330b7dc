"""Attention time per implementation at NVLM shapes: Pallas kernel vs XLA path vs jax.nn.

Shapes (bf16, NVLM-72B head layout):
- vit:     InternViT-6B self-attention over 7 tiles x 1025 tokens, 25 heads x 128, bidirectional;
- decoder: Qwen2-72B self-attention over 3,200 packed tokens (4 documents), 64 q / 8 kv heads
           x 128, causal within documents;
- xattn:   NVLM-X cross-attention, 1,024 text queries x 7 x 256 image tokens (2 images: 4 + 3
           tiles), tile-tag rows see only their tile, text sees the images before it.
For each: forward and forward+backward milliseconds (median of --repeats after one warm-up
compile) of `kernels.tile_attention` ("pallas"), `nvlm_jax.models.attention` ("xla") and
`jax.nn.dot_product_attention` (cuDNN where it accepts the call, else its XLA implementation,
with the dense mask), plus the fraction of (q block, kv block) pairs the kernel skips.

    python bench/attention.py                 # on a GPU/TPU machine (a few minutes)
    python bench/attention.py --cpu-smoke     # reduced sizes, Pallas in interpret mode on CPU

The CPU smoke run only proves the script works end to end; its timings mean nothing for GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import masks  # noqa: E402
from kernels.tile_attention import BlockSizes, effective_blocks, mask_blocks, tile_attention  # noqa: E402
from nvlm_jax.models.attention import MaskSpec, attention  # noqa: E402


def packed_mask(lengths: list[int]) -> MaskSpec:
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)[None]
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)[None]
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    return MaskSpec(causal=True, causal_by_index=True, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                    kv_positions=pos)


def xattn_mask(queries: int, tiles_per_image: list[int], tile_len: int, tag_len: int, lead: int) -> MaskSpec:
    """`lead` text tokens before any image (they see nothing), then per image its tile tags
    (`tag_len` tokens each, seeing their tile) and text that sees that image and earlier ones."""
    tiles = sum(tiles_per_image)
    kv_image = np.repeat(np.repeat(np.arange(len(tiles_per_image)), tiles_per_image), tile_len)[None]
    kv_tile = np.repeat(np.arange(tiles), tile_len)[None]
    q_image = np.full((1, queries), -1)
    q_tile = np.full((1, queries), -1)
    i, slot = lead, 0
    text = (queries - lead - tiles * tag_len) // len(tiles_per_image)
    for image, count in enumerate(tiles_per_image):
        q_image[0, i:] = image
        for _ in range(count):
            q_tile[0, i:i + tag_len] = slot
            i, slot = i + tag_len, slot + 1
        i += text
    as_ids = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return MaskSpec(q_image=as_ids(q_image), q_tile=as_ids(q_tile), kv_image=as_ids(kv_image), kv_tile=as_ids(kv_tile))


def cases(smoke: bool):
    """(name, b, s, t, heads, kv_heads, head_dim, scale, mask) per shape."""
    if smoke:
        return [
            ("vit 2x65 bidirectional", 2, 65, 65, 2, 2, 16, 1.0, MaskSpec()),
            ("decoder 96 causal packed", 1, 96, 96, 4, 2, 16, 0.25, packed_mask([40, 30, 26])),
            ("xattn 48 x 3x16 tiles", 1, 48, 48, 4, 2, 16, 0.25, xattn_mask(48, [2, 1], 16, 4, 8)),
        ]
    return [
        ("vit 7x1025 bidirectional", 7, 1025, 1025, 25, 25, 128, 1.0, MaskSpec()),
        ("decoder 3200 causal packed", 1, 3200, 3200, 64, 8, 128, 128**-0.5,
         packed_mask([1200, 900, 700, 400])),
        ("xattn 1024 x 7x256 tiles", 1, 1024, 1792, 64, 8, 128, 128**-0.5,
         xattn_mask(1024, [4, 3], 256, 8, 64)),
    ]


def timed(fn, args, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` after one warm-up (compilation) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def implementations(mask: MaskSpec, b, s, t, scale, interpret, blocks, cudnn: bool):
    dense = mask.dense(b, s, t)
    nn_mask = None if dense is None else dense[:, None]  # [b, 1, s, t]
    impls = {
        "pallas": lambda q, k, v: tile_attention(q, k, v, mask, scale=scale, interpret=interpret, block_sizes=blocks),
        "xla": lambda q, k, v: attention(q, k, v, mask, scale=scale, implementation="xla"),
    }
    for name in (["cudnn"] if cudnn else []) + ["xla"]:
        impls[f"jax.nn[{name}]"] = (lambda impl: lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=nn_mask, scale=scale, implementation=impl))(name)
    return impls


def run_case(case, dtype, repeats, interpret, smoke):
    name, b, s, t, h, kvh, d, scale, mask = case
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, s, h, d), dtype)
    k = jax.random.normal(kk, (b, t, kvh, d), dtype)
    v = jax.random.normal(kv, (b, t, kvh, d), dtype)
    blocks = BlockSizes(16, 16) if smoke else None  # smoke: small blocks so skipping shows
    eff = effective_blocks(s, t, interpret=interpret, block_sizes=blocks)
    skipped = masks.skipped_fraction(mask_blocks(mask, b, s, t, eff))
    print(f"\n{name}: b={b} s={s} t={t} heads={h}/{kvh} d={d} {jnp.dtype(dtype).name}; "
          f"blocks {eff.block_q}x{eff.block_k}, {100 * skipped:.1f}% of blocks skipped")
    print(f"  {'implementation':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    cudnn = jax.default_backend() == "gpu"
    for impl, fn in implementations(mask, b, s, t, scale, interpret, eff, cudnn).items():
        fwd = jax.jit(fn)
        both = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        cells = []
        for f in (fwd, both):
            try:
                cells.append(f"{timed(f, (q, k, v), repeats):10.2f}")
            except Exception as e:  # report and go on: e.g. cuDNN rejects a mask or a shape
                cells.append(f"  n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
        print(f"  {impl:<16}{cells[0]:>10}{cells[1]:>12}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="reduced sizes, interpret mode on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        jax.config.update("jax_platforms", "cpu")
    repeats = args.repeats or (1 if smoke else 10)
    interpret = jax.default_backend() == "cpu"
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; pallas "
          f"{'interpret mode' if interpret else 'compiled'}; median of {repeats}")
    for case in cases(smoke):
        run_case(case, jnp.float32 if smoke else jnp.bfloat16, repeats, interpret, smoke)


if __name__ == "__main__":
    main()
