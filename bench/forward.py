"""Prefill time of our jit-compiled NVLM-D forward vs the transformers-based torch forward.

Same ~100M-parameter model (weights moved by the project's weight map), same input: 2 images of
7 tiles (448 px) + 256 text tokens, f32 and bf16, both on this CPU, measured in the same run.

    python bench/forward.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.models import nvlm  # noqa: E402
from tests import torch_reference as ref  # noqa: E402


def bench_config() -> C.NVLMConfig:
    vision = C.VisionConfig(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048)
    llm = C.LLMConfig(vocab_size=16384, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4,
                      head_dim=64, intermediate_size=2048, rope_theta=1e6, max_position_embeddings=8192)
    proj = C.ProjectorConfig(input_size=4 * 512, hidden_size=2048, output_size=768)
    return C.NVLMConfig(arch="D", vision=vision, llm=llm, projector=proj, image_context_token_id=16383)


def make_inputs(cfg: C.NVLMConfig, tiles=(7, 7), text=256, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids = list(rng.integers(0, 16000, text // 2))
    for t in tiles:
        for _ in range(t):
            ids += list(rng.integers(0, 16000, 5)) + [cfg.image_context_token_id] * n
    ids += list(rng.integers(0, 16000, text - text // 2))
    pixels = rng.standard_normal((sum(tiles), 448, 448, 3)).astype(np.float32)
    return np.asarray(ids, np.int32)[None], pixels


def timeit(fn, repeats):
    fn()  # warm-up (compilation for jax)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_dtype(dtype: str, cfg, torch_model, params32, ids, pixels, repeats: int):
    """(jax seconds, torch seconds) for one prefill in `dtype`."""
    run_cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params32)
    fwd = jax.jit(lambda p, i, x: nvlm.NVLM(run_cfg).apply({"params": p}, i, x)[0])
    j_ids, j_px = jnp.asarray(ids), jnp.asarray(pixels, dtype)
    t_jax = timeit(lambda: fwd(params, j_ids, j_px).block_until_ready(), repeats)
    torch_model.to(torch.float32 if dtype == "float32" else torch.bfloat16)
    t_torch = timeit(lambda: torch_model(ids, pixels), repeats)
    return t_jax, t_torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = bench_config()
    ids, pixels = make_inputs(cfg)
    torch_model = ref.TorchNVLMD(cfg, seed=0)
    params32 = ref.jax_params_for(torch_model)
    print(f"NVLM-D prefill, {C.param_count(cfg) / 1e6:.1f}M params, {ids.shape[1]} tokens "
          f"({pixels.shape[0]} tiles of 448 px); {platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}")
    for dtype in ("float32", "bfloat16"):
        t_jax, t_torch = bench_dtype(dtype, cfg, torch_model, params32, ids, pixels, args.repeats)
        print(f"{dtype:9s} jax {t_jax:7.3f} s   torch {t_torch:7.3f} s   jax/torch time {t_jax / t_torch:.2f}x")


if __name__ == "__main__":
    main()
