"""Training-step time and MFU of a ~100M-parameter NVLM-D on this machine.

MFU = analytic training FLOPs of the step (`nvlm_jax.train.flops`) / median step time / peak,
where the peak is measured in the same run, before and after the steps (the larger is used): the
best FLOP/s of a large bf16×bf16→f32 matmul (`jnp.dot(..., preferred_element_type=f32)`), the
op the model's linear layers use.

    python bench/train_step.py [--batch 8] [--seq 512] [--steps 5] [--stage sft] [--dtype bfloat16]

`NVLM_JAX_HOST_MALLOC=keep` measures with freed host memory kept for reuse
(`nvlm_jax.host_memory`); the default is glibc's own behaviour.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax import host_memory  # noqa: E402
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from nvlm_jax.train import flops as flops_lib  # noqa: E402
from nvlm_jax.train import freeze, metrics, optim  # noqa: E402
from nvlm_jax.train import step as step_lib  # noqa: E402


def bench_config(dtype: str, remat: str) -> C.NVLMConfig:
    """~100M parameters: a 6-layer 512-wide ViT on 448-px tiles, a 12-layer 768-wide decoder."""
    vision = C.VisionConfig(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048)
    llm = C.LLMConfig(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                      head_dim=64, intermediate_size=2048, rope_theta=1e6, max_position_embeddings=8192)
    proj = C.ProjectorConfig(input_size=4 * 512, hidden_size=2048, output_size=768)
    return C.NVLMConfig(arch="D", vision=vision, llm=llm, projector=proj, image_context_token_id=16383,
                        dtype=dtype, param_dtype="float32", remat_policy=remat)


def make_batch(cfg: C.NVLMConfig, batch: int, seq: int, tiles: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of one sample each: text, `tiles` tiles of image tokens, text; loss on the second half."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens * tiles
    ids = rng.integers(0, cfg.image_context_token_id - 1, size=(batch, seq)).astype(np.int32)
    ids[:, 16:16 + n] = cfg.image_context_token_id
    targets = np.roll(ids, -1, axis=1)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 2: seq - 1] = True
    size = cfg.vision.image_size
    return dict(
        input_ids=ids, targets=targets, loss_mask=loss_mask,
        segment_ids=np.ones((batch, seq), np.int32),
        positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        pixel_values=rng.normal(size=(batch, tiles, size, size, 3)).astype(np.float32),
        tile_valid=np.ones((batch, tiles), bool), tile_image=np.zeros((batch, tiles), np.int32),
        token_image=np.zeros((batch, seq), np.int32), token_tile=np.full((batch, seq), -1, np.int32),
    )


def build_step(cfg: C.NVLMConfig, batch_size: int, seq: int, tiles: int, stage: str, mesh):
    """(jitted train step, train state, device batch, param shapes, trainable mask) for one
    `make_batch` batch on `mesh`, from random params. Call under `jax.set_mesh(mesh)` and the
    default logical-axis rules."""
    ocfg = optim.OptimConfig(lr_max=1e-4, lr_min=1e-5, warmup_steps=1, total_steps=1000)
    opt = optim.make_optimizer(ocfg)
    shapes = step_lib.param_shapes(cfg)
    mask = freeze.trainable_mask(shapes, "D", stage)
    shardings, _ = step_lib.train_state_shardings(cfg, opt, mask, mesh)
    rng = np.random.default_rng(0)
    params = jax.device_put(jax.tree_util.tree_map(
        lambda s: (0.02 * rng.normal(size=s.shape)).astype(s.dtype), shapes))
    batch = make_batch(cfg, batch_size, seq, tiles)
    state = jax.jit(lambda p: step_lib.init_train_state(p, opt, mask), out_shardings=shardings)(params)
    bshard = step_lib.batch_sharding(mesh, batch_size)
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, opt, mask, optim.lr_schedule(ocfg)),
                                   shardings, bshard)
    return step, state, step_lib.device_batch(batch, bshard), shapes, mask


def run_steps(step, state, dev_batch, steps: int):
    """(compile seconds, per-step seconds of `steps` steps after one warm-up step, last metrics)."""
    start = time.perf_counter()
    compiled = step.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - start
    state, m = compiled(state, dev_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = compiled(state, dev_batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    return compile_s, times, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stage", default="sft", choices=freeze.STAGES)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    parser.add_argument("--peak_size", type=int, default=4096)
    args = parser.parse_args()
    kept = host_memory.keep_freed_memory()  # if $NVLM_JAX_HOST_MALLOC=keep, as experiments/train.py

    cfg = bench_config(args.dtype, args.remat)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        step, state, dev_batch, shapes, mask = build_step(cfg, args.batch, args.seq, args.tiles, args.stage, mesh)
        peaks = [metrics.measure_peak_flops(args.peak_size, repeats=3)]
        compile_s, times, m = run_steps(step, state, dev_batch, args.steps)
    peaks.append(metrics.measure_peak_flops(args.peak_size, repeats=3))
    peak = max(peaks)  # the machine's capability; a busy machine lowers the step rate and a probe alike
    trained = freeze.trained_subtrees("D", args.stage)
    f = flops_lib.batch_flops(cfg, args.batch, args.seq, args.tiles, trained)
    step_s = float(np.median(times))
    n_params = C.param_count(cfg)
    n_trained = freeze.count_params(freeze.partition(shapes, mask)[0])
    print(f"date {datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"cpus {os.cpu_count()}  jax {jax.__version__}  backend {jax.default_backend()}  "
          f"host malloc {'keep' if kept else 'system'}")
    print(f"model: {n_params / 1e6:.1f}M params ({n_trained / 1e6:.1f}M trained, stage {args.stage}), "
          f"dtype {args.dtype} (f32 master weights), remat {args.remat}")
    print(f"batch: {args.batch} x {args.seq} tokens, {args.tiles} tile(s) of {cfg.vision.image_size} px per row; "
          f"final loss {float(m['loss']):.3f}")
    print(f"compile {compile_s:.1f} s; step median {step_s * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, "
          f"max {max(times) * 1e3:.0f}) over {args.steps} steps")
    print(f"step FLOPs {f.training / 1e12:.3f} TFLOP (vision {f.vision.forward / 1e12:.3f} fwd, decoder+head "
          f"{(f.decoder.forward + f.head.forward) / 1e12:.3f} fwd) -> {f.training / step_s / 1e9:.1f} GFLOP/s")
    print(f"peak (bf16 x bf16 -> f32 {args.peak_size}^3 matmul, before/after the steps) "
          f"{' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s -> {peak / 1e9:.1f}")
    print(f"MFU {f.training / step_s / peak:.1%}")


if __name__ == "__main__":
    main()
