"""Data pipeline throughput: samples/s and tokens/s of `nvlm_jax.data.make_pipeline` end to end.

Synthetic OCR and chart images of 1344x896 px, which tile to 6 + 1 tiles of 448 px (the released
NVLM-D-72B settings: 256 image tokens per tile, so ~1,800 tokens per sample), NVLM-D packing
into rows of `--seq_len` tokens and `--tiles_per_row` tile slots. Every stage runs: render,
decode, tile, prompt, tokenize, targets, mix, pack, batch (float32 pixel normalisation into the
batch array). Measured with 0, 1 and 2 `mp_prefetch` workers after a warm-up (worker start-up is
excluded). Tokens count non-padding positions. "main CPU ms/sample" is the calling process's CPU
time per sample: with 0 workers the whole pipeline's cost (independent of other load on the
machine), with workers what is left in the training process (receiving batches).

Run from the repo root: `python bench/data_pipeline.py [--batches 20] [--workers 0,1,2]`.
Uses the release (Qwen2) tokenizer when its files are in NVLM_REFERENCE_DIR (default
../shared/reference), else the tiny test tokenizer (token counts differ only in the text part).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import bench_tokenizer  # noqa: E402
from nvlm_jax import config as config_lib  # noqa: E402
from nvlm_jax.data import pipeline, sources, synthetic  # noqa: E402


def measure(tok, model_cfg, *, workers: int, batches: int, batch_size: int, seq_len: int, tiles: int) -> dict:
    spec = synthetic.ImageSpec(1344, 1344, (1.5,))
    data = pipeline.DataConfig(
        sources=(
            sources.SyntheticSource("ocr", image_spec=spec, weight=1.0),
            sources.SyntheticSource("chart", image_spec=spec, weight=1.0),
        ),
        num_workers=workers,
        log_every_batches=0,
    )
    it = pipeline.make_pipeline(
        data, model_cfg, tok, split="train", seed=0, batch_size=batch_size, seq_len=seq_len, tiles_per_row=tiles
    )
    with it:
        for _ in range(2):  # warm-up: worker start-up, first encoder copy
            next(it)
        samples = tokens = valid_tiles = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(it)
            seg = batch["segment_ids"]
            samples += int(seg.max(1).sum())
            tokens += int((seg > 0).sum())
            valid_tiles += int(batch["tile_valid"].sum())
        elapsed = time.perf_counter() - start
        main_cpu = time.process_time() - cpu_start
    return {
        "workers": workers,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "batches_per_s": batches / elapsed,
        "tiles_per_sample": valid_tiles / max(samples, 1),
        "samples_per_row": samples / (batches * batch_size),
        "token_fill": tokens / (batches * batch_size * seq_len),
        "main_cpu_ms_per_sample": 1000 * main_cpu / max(samples, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--tiles_per_row", type=int, default=14)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    tok, tok_name = bench_tokenizer(Path(tempfile.mkdtemp()))
    model_cfg = pipeline.config_for_tokenizer(config_lib.nvlm_d_72b(), tok)
    print(
        f"data pipeline, NVLM-D, 448-px tiles (6+1 per sample), {tok_name} tokenizer, batch {args.batch_size} x "
        f"{args.seq_len} tokens x {args.tiles_per_row} tiles, {args.batches} batches, {os.cpu_count()} CPUs"
    )
    print(
        f"{'workers':>7} {'samples/s':>10} {'tokens/s':>10} {'batches/s':>10} {'tiles/sample':>13} "
        f"{'samples/row':>12} {'token fill':>11} {'main CPU ms/sample':>19}"
    )
    for workers in (int(w) for w in args.workers.split(",")):
        r = measure(
            tok,
            model_cfg,
            workers=workers,
            batches=args.batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            tiles=args.tiles_per_row,
        )
        print(
            f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['batches_per_s']:>10.2f} "
            f"{r['tiles_per_sample']:>13.2f} {r['samples_per_row']:>12.2f} {r['token_fill']:>11.2f} "
            f"{r['main_cpu_ms_per_sample']:>19.1f}"
        )


if __name__ == "__main__":
    main()
