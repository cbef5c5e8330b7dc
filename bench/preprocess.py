"""Host preprocessing throughput: decode + tile + normalise + prompt + tokenize, images/s.

Compares `nvlm_jax.processing` (one resize, tiles as views, a lookup-table normalisation written
straight into the output, prompt ids built from segments) with a straightforward baseline
written here (PIL crop per tile, per-tile `np.asarray(tile) / 255` and normalisation in float64,
the release's string expansion and one tokenizer call on the whole prompt), on the same 24
mixed-size images generated with a fixed seed and saved as PNG/JPEG to a temporary folder.
Both run single-threaded in the same process, interleaved, and must give the same pixels and
token ids; a per-stage breakdown shows where the time goes. The batch API (`tile_images` on a
thread pool over all cores, as a data loader calls it) is timed in the same passes against the
same single-threaded baseline: that is the figure the 2x target applies to, since decode and
the two bicubic resizes are identical Pillow calls in both single-threaded pipelines. Its ratio
is the median over repeats of (baseline pass / threaded pass), each pair timed back to back:
the second core of this shared VM is intermittently slower for seconds at a time, which moves a
threaded pass by up to 20% while the single-threaded passes barely change.

Run from the repo root: `python bench/preprocess.py [--repeats 9]`. Uses the release (Qwen2)
tokenizer when its files are in NVLM_REFERENCE_DIR (default ../shared/reference), else the tiny
test tokenizer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import bench_tokenizer  # noqa: E402
from nvlm_jax.processing import prompt as prompt_lib  # noqa: E402
from nvlm_jax.processing import tiling  # noqa: E402

# (width, height): the sizes pinned in the tiling tests plus common camera/screen sizes.
SIZES = [
    (448, 448), (640, 640), (800, 600), (1024, 768), (1920, 1080), (1280, 720),
    (600, 800), (2480, 3508), (300, 1200), (4000, 1000), (100, 1000), (634, 634),
    (633, 633), (10000, 10), (10, 10000), (3024, 4032), (1600, 1200), (512, 512),
    (720, 1280), (1366, 768), (2048, 1536), (350, 350), (1000, 100), (3000, 2000),
]  # fmt: skip
QUESTIONS = [
    "Please describe the image shortly.",
    "What is written in the top left corner?",
    "How many red circles are there?",
    "<image>\nWhat colour is the largest shape? Answer with one word.",
]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_images(folder: Path, seed: int = 0) -> list[Path]:
    """Writes the benchmark images: gradients, random boxes and mild noise, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        img = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(1, w // 3 + 2)), y0 + int(rng.integers(1, h // 3 + 2))
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        path = folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg")
        pil.save(path, quality=90) if path.suffix == ".jpg" else pil.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# The two pipelines. `clock`, when given, accumulates seconds per stage.

STAGES = ("decode", "resize", "tiles + normalise", "prompt + tokenize")


def _tick(clock: dict[str, float] | None, stage: str, since: float) -> float:
    now = time.perf_counter()
    if clock is not None:
        clock[stage] = clock.get(stage, 0.0) + now - since
    return now


def ours(path: Path, question: str, tok) -> tuple[np.ndarray, np.ndarray]:
    """The public API, as a data pipeline calls it."""
    tiled = tiling.tile_image(path)
    encoded = prompt_lib.encode_prompt(tok, question, [tiled.num_tiles])
    return tiled.pixels, encoded.input_ids


def ours_threaded(paths, tok, threads: int) -> float:
    """The batch API: `tile_images` on a thread pool, then the prompts; seconds for all images."""
    start = time.perf_counter()
    tiled = tiling.tile_images(paths, num_threads=threads)
    for i, t in enumerate(tiled):
        prompt_lib.encode_prompt(tok, QUESTIONS[i % len(QUESTIONS)], [t.num_tiles])
    return time.perf_counter() - start


def ours_by_stage(path: Path, question: str, tok, clock: dict[str, float]) -> None:
    """`ours` split into its stages (same steps as `tiling.tile_image`) for the breakdown."""
    t = time.perf_counter()
    image = tiling.open_image(path)
    t = _tick(clock, "decode", t)
    cols, rows = tiling.select_grid(*image.size)
    resized = np.asarray(image.resize((448 * cols, 448 * rows), Image.BICUBIC))
    thumb = np.asarray(image.resize((448, 448), Image.BICUBIC)) if cols * rows > 1 else None
    t = _tick(clock, "resize", t)
    n = cols * rows
    pixels = np.empty((n + (thumb is not None), 448, 448, 3), np.float32)
    view = resized.reshape(rows, 448, cols, 448, 3).transpose(0, 2, 1, 3, 4)
    tiling.normalize_tiles(view, out=pixels[:n].reshape(rows, cols, 448, 448, 3))
    if thumb is not None:
        tiling.normalize_tiles(thumb, out=pixels[n])
    t = _tick(clock, "tiles + normalise", t)
    prompt_lib.encode_prompt(tok, question, [pixels.shape[0]])
    _tick(clock, "prompt + tokenize", t)


def baseline(
    path: Path, question: str, tok, clock: dict[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The release's steps written plainly: per-tile PIL crops and arrays, string prompt."""
    t = time.perf_counter()
    image = Image.open(path).convert("RGB")
    t = _tick(clock, "decode", t)
    cols, rows = tiling.select_grid(*image.size)
    resized = image.resize((448 * cols, 448 * rows), Image.BICUBIC)
    thumb = image.resize((448, 448), Image.BICUBIC) if cols * rows > 1 else None
    t = _tick(clock, "resize", t)
    tiles = []
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        tiles.append(resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448)))
    if thumb is not None:
        tiles.append(thumb)
    arrays = []
    for tile in tiles:
        x = np.asarray(tile) / 255.0
        x = (x - MEAN) / STD
        arrays.append(x.astype(np.float32))
    pixels = np.stack(arrays)
    t = _tick(clock, "tiles + normalise", t)
    # The release's prompt: expand the string, then tokenize it whole. (Tokenizing it piece by
    # piece would be no faster and gives wrong ids: BPE merges across tags, e.g. "<Image><tile".)
    tags = [f"<tile_{k}>" for k in range(1, len(tiles))] + ["<tile_global_thumbnail>"]
    image_text = "<Image>" + "".join(t + "<|vision_pad|>" * 256 for t in tags) + "</Image>"
    body = question if "<image>" in question else "<image>\n" + question
    text = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        + body.replace("<image>", image_text, 1)
        + "<|im_end|><|im_start|>assistant\n"
    )
    ids = np.asarray(tok(text, add_special_tokens=False).input_ids, np.int32)
    _tick(clock, "prompt + tokenize", t)
    return pixels, ids


def time_pass(fn, paths, tok) -> float:
    start = time.perf_counter()
    for i, path in enumerate(paths):
        fn(path, QUESTIONS[i % len(QUESTIONS)], tok)
    return time.perf_counter() - start


def stage_pass(fn, paths, tok) -> dict[str, float]:
    clock: dict[str, float] = {}
    for i, path in enumerate(paths):
        fn(path, QUESTIONS[i % len(QUESTIONS)], tok, clock)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per pipeline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images")
        tok, tok_name = bench_tokenizer(tmp)

        total_tiles = 0
        for i, path in enumerate(paths):  # same results, and warm-up
            q = QUESTIONS[i % len(QUESTIONS)]
            (p_ours, ids_ours), (p_base, ids_base) = ours(path, q, tok), baseline(path, q, tok)
            assert p_ours.shape == p_base.shape, path
            np.testing.assert_allclose(p_ours, p_base, rtol=0, atol=2e-6)  # float64 vs float32
            np.testing.assert_array_equal(ids_ours, ids_base)
            total_tiles += p_ours.shape[0]

        threads = os.cpu_count() or 1
        totals: dict[str, list[float]] = {"ours": [], "baseline": [], "threaded": []}
        stages: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            totals["ours"].append(time_pass(ours, paths, tok))
            totals["baseline"].append(time_pass(baseline, paths, tok))
            totals["threaded"].append(ours_threaded(paths, tok, threads))  # paired with baseline
            stages["ours"].append(stage_pass(ours_by_stage, paths, tok))
            stages["baseline"].append(stage_pass(baseline, paths, tok))

    n = len(paths)
    med = {k: statistics.median(v) for k, v in totals.items()}
    per_stage = {
        k: {s: statistics.median(c[s] for c in v) for s in STAGES} for k, v in stages.items()
    }
    print(f"# preprocess bench: {n} images, {total_tiles} tiles of 448x448, tokenizer: {tok_name}")
    print(f"# {os.cpu_count()} CPUs visible; single-threaded; medians of {args.repeats} passes")
    print(f"{'seconds per pass':<22} {'ours':>8} {'baseline':>9} {'ratio':>7}")
    for stage in STAGES:
        a, b = per_stage["ours"][stage], per_stage["baseline"][stage]
        print(f"{stage:<22} {a:8.3f} {b:9.3f} {b / a:6.2f}x")
    print(f"{'total (end to end)':<22} {med['ours']:8.3f} {med['baseline']:9.3f} "
          f"{med['baseline'] / med['ours']:6.2f}x")  # fmt: skip
    print(f"{'images/s':<22} {n / med['ours']:8.1f} {n / med['baseline']:9.1f}")
    paired = sorted(b / t for b, t in zip(totals["baseline"], totals["threaded"], strict=True))
    print(f"tile_images on {threads} threads: {n / med['threaded']:.1f} images/s, "
          f"{statistics.median(paired):.2f}x the single-threaded baseline (median of per-repeat "
          f"ratios; range {paired[0]:.2f}-{paired[-1]:.2f}x; ratio of medians "
          f"{med['baseline'] / med['threaded']:.2f}x)")
    shared = ("decode", "resize")
    after = [s for s in STAGES if s not in shared]
    a_after = sum(per_stage["ours"][s] for s in after)
    b_after = sum(per_stage["baseline"][s] for s in after)
    b_shared = sum(per_stage["baseline"][s] for s in shared)
    b_total = b_shared + b_after
    print(
        f"speed-up end to end: {med['baseline'] / med['ours']:.2f}x; after decode+resize: "
        f"{b_after / a_after:.2f}x. Decode + the two bicubic resizes are the same Pillow calls in "
        f"both (bit-exactness needs them) and are {b_shared / b_total:.0%} of the baseline, so no "
        f"exact single-threaded pipeline can beat {b_total / b_shared:.2f}x here."
    )


if __name__ == "__main__":
    main()
