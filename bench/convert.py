"""Conversion throughput and peak host memory on a synthetic multi-GB NVLM-D checkpoint.

Writes a fake-but-valid release-layout checkpoint (a wide, shallow Qwen2-style LLM, a small
InternViT with zero dummy heads, the projector; q/k/v and ViT attention tensors stored in fp32
like the release, the rest bf16) as several safetensors shards into a temporary folder, evicts
those files from the page cache (fsync + POSIX_FADV_DONTNEED, so the conversion reads from
disk), then runs `nvlm_jax.convert.convert` in a fresh subprocess and reports its wall time,
source GB/s and peak RSS (VmHWM) against the target `1.5 x largest tensor + 1 GB`.

Run from the repo root: `python bench/convert.py [--gb 4.3] [--keep DIR] [--quantize int8|int4]`
(`--quantize`: the conversion stores quantized Linear kernels, quantized while streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nvlm_jax.safetensors_io import SafetensorsWriter, TensorSpec  # noqa: E402

GB = 1e9
FP32 = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "attn.qkv", "attn.proj.weight", "attn.q_norm",
        "attn.k_norm")


def synthetic_config(llm_layers: int) -> dict:
    """A release-format config: LLM hidden 4096, 152064-token vocab, `llm_layers` layers."""
    ref = json.loads((REPO_ROOT.parent / "shared/reference/nvlm_d_72b_config.json").read_text()) if (
        REPO_ROOT.parent / "shared/reference/nvlm_d_72b_config.json").is_file() else None
    llm = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=4096,
               num_hidden_layers=llm_layers, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
               rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False)
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=1024,
                  num_hidden_layers=4, num_attention_heads=8, intermediate_size=4096, image_size=448, patch_size=14,
                  norm_type="rms_norm", layer_norm_eps=1e-6, qk_normalization=True, qkv_bias=False)
    cfg = dict(ref or {}, architectures=["NVLM_D"], model_type="NVLM_D", downsample_ratio=0.5, ps_version="v2",
               select_layer=-1, template="chatml", max_dynamic_patch=6, use_thumbnail=True)
    cfg["llm_config"], cfg["vision_config"] = llm, vision
    return cfg


def tensor_specs(cfg: dict, dummy_heads: int) -> list[TensorSpec]:
    lc, vc = cfg["llm_config"], cfg["vision_config"]
    e, f, v = lc["hidden_size"], lc["intermediate_size"], lc["vocab_size"]
    hd = e // lc["num_attention_heads"]
    kv = lc["num_key_value_heads"] * hd
    c, vh = vc["hidden_size"], vc["num_attention_heads"]
    vd = c // vh
    width = (vh + dummy_heads) * vd
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (v, e),
        "language_model.model.norm.weight": (e,),
        "language_model.lm_head.weight": (v, e),
        "mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,),
        "mlp1.1.weight": (f, 4 * c), "mlp1.3.weight": (e, f),
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, 1025, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (c,),
    }
    for i in range(lc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (e, e), p + "self_attn.q_proj.bias": (e,),
            p + "self_attn.k_proj.weight": (kv, e), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (e, e),
            p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e), p + "mlp.down_proj.weight": (e, f),
        })
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        shapes.update({
            p + "norm1.weight": (c,), p + "norm2.weight": (c,), p + "ls1": (c,), p + "ls2": (c,),
            p + "attn.qkv.weight": (3 * width, c), p + "attn.q_norm.weight": (width,),
            p + "attn.k_norm.weight": (width,), p + "attn.proj.weight": (c, width), p + "attn.proj.bias": (c,),
            p + "mlp.fc1.weight": (vc["intermediate_size"], c), p + "mlp.fc1.bias": (vc["intermediate_size"],),
            p + "mlp.fc2.weight": (c, vc["intermediate_size"]), p + "mlp.fc2.bias": (c,),
        })  # fmt: skip
    return [TensorSpec(k, s, np.float32 if any(t in k for t in FP32) else ml_dtypes.bfloat16)
            for k, s in shapes.items()]


def fill(spec: TensorSpec, block: np.ndarray, real_heads: int, head_dim: int) -> np.ndarray:
    """Pseudo-random values (a repeated random block), with dummy ViT heads set to zero."""
    n = int(np.prod(spec.shape))
    reps = -(-n // block.size)
    x = np.tile(block, reps)[:n].reshape(spec.shape).astype(spec.dtype)
    k = spec.key
    if k.endswith("attn.qkv.weight"):
        x.reshape(3, -1, head_dim, x.shape[-1])[:, real_heads:] = 0
    elif k.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        x[real_heads * head_dim :] = 0
    elif k.endswith("attn.proj.weight"):
        x[:, real_heads * head_dim :] = 0
    return x


def write_checkpoint(folder: Path, llm_layers: int, shard_bytes: float) -> tuple[int, int]:
    """Writes the synthetic checkpoint; returns (total bytes, largest tensor bytes)."""
    from nvlm_jax.processing import make_tiny_tokenizer

    cfg = synthetic_config(llm_layers)
    vc = cfg["vision_config"]
    specs = tensor_specs(cfg, dummy_heads=2)
    heads, head_dim = vc["num_attention_heads"], vc["hidden_size"] // vc["num_attention_heads"]
    block = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(np.float32)
    shards: list[list[TensorSpec]] = [[]]
    for s in specs:
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + s.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(s)
    weight_map = {}
    for n, members in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / name, members, {"format": "pt"}) as w:
            for s in members:
                w.write(s.key, fill(s, block, heads, head_dim))
                weight_map[s.key] = name
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(cfg))
    make_tiny_tokenizer(folder)
    for p in folder.glob("*.safetensors"):
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return total, max(s.nbytes for s in specs)


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from nvlm_jax import convert
t = time.perf_counter()
convert.convert({src!r}, {dst!r}, dtype="bfloat16", progress=False, quantize={quantize!r})
wall = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps(dict(wall=wall, vmhwm_kb=int(status["VmHWM"].split()[0]),
                      ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm_layers", type=int, default=3, help="LLM layers (3 gives ~4.3 GB)")
    parser.add_argument("--shard_gb", type=float, default=1.0)
    parser.add_argument("--keep", type=str, default=None, help="work in this folder and keep it")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="store quantized kernels")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nvlm_bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    print(f"free disk at {work}: {free / GB:.1f} GB")
    try:
        src, dst = work / "hf", work / "orbax"
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        src.mkdir()
        t = time.perf_counter()
        total, largest = write_checkpoint(src, args.llm_layers, args.shard_gb * GB)
        if free < 2.5 * total:
            raise SystemExit(f"need ~{2.5 * total / GB:.1f} GB free disk, have {free / GB:.1f} GB")
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic checkpoint: {total / GB:.2f} GB in {shards} shards, largest tensor {largest / GB:.2f} GB "
              f"(written in {time.perf_counter() - t:.0f} s, evicted from the page cache)")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        code = CHILD.format(repo=str(REPO_ROOT), src=str(src), dst=str(dst), quantize=args.quantize)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        r = json.loads(run.stdout.strip().splitlines()[-1])
        peak = r["vmhwm_kb"] * 1024
        target = 1.5 * largest + 1 * GB
        out_bytes = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        print(f"convert{' --quantize=' + args.quantize if args.quantize else ''}: {r['wall']:.1f} s, "
              f"{total / GB / r['wall']:.2f} GB/s of source data, "
              f"output {out_bytes / GB:.2f} GB (Orbax, zstd)")
        print(f"peak RSS (VmHWM): {peak / GB:.2f} GB; target 1.5 x largest tensor + 1 GB = {target / GB:.2f} GB "
              f"-> {'OK' if peak <= target else 'OVER'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
