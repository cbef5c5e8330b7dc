"""SFT training-step time per sample for NVLM-D, X and H at the paper's decoder lengths, scaled.

Paper Table 3 (Yi-34B, 6+1 tiles): decoder sequence X 1,024 < H 1,280 < D 2,816 tokens and
throughput X 50.6 > H 36.2 > D 28.8 samples/s. Here everything is scaled down by 4: 224-px tiles
give 64 tokens per tile (7 tiles = 448 image tokens), 256 text tokens, so decoder lengths are
D 704, X 256, H 320. The ViT is frozen (forward only) and the rest trained, as in SFT.

    python bench/arch_throughput.py [--batch 2] [--repeats 3]
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

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.models import nvlm  # noqa: E402

TEXT, TILES, TAG = 256, 7, 5
PAPER = {"X": (1024, 50.6), "H": (1280, 36.2), "D": (2816, 28.8)}  # decoder length, samples/s


def bench_config(arch: str) -> C.NVLMConfig:
    vision = C.VisionConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, image_size=224)
    llm = C.LLMConfig(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                      intermediate_size=1408, rope_theta=1e6, max_position_embeddings=4096)
    proj = C.ProjectorConfig(input_size=1024, hidden_size=1408, output_size=512, num_layers=1 if arch == "X" else 2)
    return C.NVLMConfig(arch=arch, vision=vision, llm=llm, projector=proj, image_context_token_id=8191,
                        xattn_every=4 if arch != "D" else None, max_tag_tokens=TAG)


def make_batch(cfg: C.NVLMConfig, batch: int, seed: int = 0):
    """Text, then one image of 6 tiles + thumbnail (tags of TAG tokens; context tokens where the
    arch puts tiles in the decoder), then text; targets on the second half of the text."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids, tok_image, tok_tile = [], [], []

    def put(tokens, image, tile):
        ids.extend(tokens)
        tok_image.extend([image] * len(tokens))
        tok_tile.extend([tile] * len(tokens))

    put(list(rng.integers(0, 8000, TEXT // 2)), -1, -1)
    for k in range(TILES):
        put(list(rng.integers(0, 8000, TAG)), 0, k)
        if cfg.arch == "D" or (cfg.arch == "H" and k == TILES - 1):
            put([cfg.image_context_token_id] * n, 0, -1)
    put(list(rng.integers(0, 8000, TEXT - TEXT // 2 - TAG * TILES)), 0, -1)
    s = len(ids)
    row = dict(input_ids=ids, targets=list(rng.integers(0, 8000, s)), loss_mask=[i >= s - TEXT // 2 for i in range(s)],
               segment_ids=[1] * s, positions=list(range(s)), token_image=tok_image, token_tile=tok_tile)
    out = {k: np.asarray([v] * batch) for k, v in row.items()}
    out["pixel_values"] = rng.standard_normal((batch, TILES, 224, 224, 3)).astype(np.float32)
    out["tile_valid"] = np.ones((batch, TILES), bool)
    out["tile_image"] = np.zeros((batch, TILES), np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


def train_step_fn(cfg: C.NVLMConfig):
    def loss(trainable, frozen, batch):
        logits = nvlm.apply_batch({**trainable, **frozen}, cfg, batch)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask) / jnp.sum(mask)

    @jax.jit
    def step(trainable, frozen, batch):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
        # Plain SGD: the optimiser's cost is the same across archs; the forward/backward is not.
        return jax.tree_util.tree_map(lambda p, g: p - 1e-4 * g, trainable, grads), value

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU, batch {args.batch}, f32, ViT frozen")
    rows = {}
    for arch in ("X", "H", "D"):
        cfg = bench_config(arch)
        params = nvlm.init_params(cfg, jax.random.key(0))
        frozen = {"vision": params.pop("vision")}
        batch = make_batch(cfg, args.batch)
        step = train_step_fn(cfg)
        params, _ = step(params, frozen, batch)
        jax.block_until_ready(params)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            params, value = step(params, frozen, batch)
            jax.block_until_ready(value)
            times.append(time.perf_counter() - t0)
        rows[arch] = (batch["input_ids"].shape[1], float(np.median(times)) / args.batch)
    print("arch | decoder tokens | s/sample | samples/s | relative to D | paper length | paper relative to D")
    for arch in ("X", "H", "D"):
        length, per = rows[arch]
        paper_len, paper_rate = PAPER[arch]
        print(f"{arch} | {length} | {per:.3f} | {1 / per:.2f} | {rows['D'][1] / per:.2f}x | {paper_len} | "
              f"{paper_rate / PAPER['D'][1]:.2f}x")


if __name__ == "__main__":
    main()
