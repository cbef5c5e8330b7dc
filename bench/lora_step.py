"""LoRA vs full SFT on the ~126M-parameter bench NVLM-D (`bench/train_step.py`), in one run:
trainable parameters, optimizer-state bytes and the median training-step time of each, the two
steps timed alternately so machine load falls on both alike.

Full SFT trains the LLM and the projector (stage "sft", f32 master weights); LoRA puts rank-R
adapters on `--targets` (default the LLM's attention and MLP projections and the projector),
freezing their base (an untargeted part the stage trains still trains in full). A third run,
the floor, adapts nothing and freezes the LLM (stage "pretrain": projector only): the forward and
the input gradients through the frozen LLM that any LoRA step over this model must do. All
compute in `--dtype`. XLA's own FLOP count of each compiled step is printed too.

    python bench/lora_step.py [--rank 16] [--targets llm,projector] [--batch 8] [--seq 512] [--rounds 5]
        [--layer_layout stacked|per_layer]

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

from bench.train_step import bench_config, build_step  # noqa: E402
from nvlm_jax import config as C  # noqa: E402
from nvlm_jax import host_memory  # noqa: E402
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from nvlm_jax.train import freeze  # noqa: E402


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="llm,projector")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each, alternated")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layer_layout", default="stacked", choices=("stacked", "per_layer"),
                        help="the decoder layers' params: stacked (a scan, as training runs) or per layer")
    args = parser.parse_args()
    kept = host_memory.keep_freed_memory()  # if $NVLM_JAX_HOST_MALLOC=keep, as experiments/train.py

    base = bench_config(args.dtype, "none").replace(layer_layout=args.layer_layout)
    lora = C.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    # name -> (config, stage). The third run adapts nothing and trains only the projector with the
    # ViT and LLM frozen: forward plus input gradients through the frozen LLM, the least any LoRA
    # step over the same model must do (its floor).
    runs = {"full SFT": (base, "sft"), f"LoRA r{args.rank} ({args.targets})": (base.replace(lora=lora), "sft"),
            "floor: frozen LLM, no adapters": (base, "pretrain")}
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    built, times, info = {}, {name: [] for name in runs}, {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        for name, (cfg, stage) in runs.items():
            step, state, batch, shapes, mask = build_step(cfg, args.batch, args.seq, 1, stage, mesh)
            start = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            compile_s = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            state, m = compiled(state, batch)  # warm-up
            jax.block_until_ready(m)
            built[name] = [compiled, state, batch]
            info[name] = dict(params=freeze.count_params(shapes),
                              trainable=freeze.count_params(freeze.partition(shapes, mask)[0]),
                              opt_bytes=_bytes(state.opt_state), compile_s=compile_s,
                              gflop=float(cost.get("flops", 0.0)) / 1e9)
        for _ in range(args.rounds):
            for name in runs:
                compiled, state, batch = built[name]
                start = time.perf_counter()
                state, m = compiled(state, batch)
                jax.block_until_ready(m)
                times[name].append(time.perf_counter() - start)
                built[name][1] = state
    full, lora_run, floor = list(runs)
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}  "
          f"cpus {os.cpu_count()}  jax {jax.__version__}  backend {jax.default_backend()}  "
          f"load {os.getloadavg()[0]:.2f}  host malloc {'keep' if kept else 'system'}")
    print(f"model: {info[full]['params'] / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens + 1 tile "
          f"per row, compute {args.dtype}, stage sft, {args.layer_layout} decoder layers")
    print("run | trainable params | optimizer state | XLA GFLOP | compile s | step median (min-max) ms")
    for name in runs:
        t = np.asarray(times[name]) * 1e3
        i = info[name]
        print(f"{name} | {i['trainable'] / 1e6:.2f}M | {i['opt_bytes'] / 2**20:.1f} MiB | {i['gflop']:.0f} | "
              f"{i['compile_s']:.1f} | "
              f"{np.median(t):.0f} ({t.min():.0f}-{t.max():.0f})")
    ratio = np.median(times[lora_run]) / np.median(times[full])
    opt_share = info[lora_run]["opt_bytes"] / info[full]["opt_bytes"]
    print(f"LoRA / full: step time {ratio:.2f}x, XLA FLOPs {info[lora_run]['gflop'] / info[full]['gflop']:.2f}x, "
          f"optimizer state {opt_share:.1%}, trainable {info[lora_run]['trainable'] / info[full]['trainable']:.1%}")
    print(f"floor / full: step time {np.median(times[floor]) / np.median(times[full]):.2f}x "
          f"(the adapters' own cost is the LoRA step minus the floor)")


if __name__ == "__main__":
    main()
