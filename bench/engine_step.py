"""One decode step of the serve engine (`nvlm_jax.serve.engine`), by slots and cache view.

The 126M-param NVLM-D of `bench/serve.py` (random weights, params in the compute dtype, decoder
per layer as `load_pretrained` holds it on CPU), an engine of `--slots` slots x `--max_len`
columns. For one running slot (the lone-request program) and for every slot, at each `--views`
(the power-of-two cache prefix a step attends to, chosen by the longest running sequence), the
median and best of `--repeats` steps, each to its tokens on the host, as `Engine._step` runs them.
The cost of a step should grow with the view by the attention over it only.

    python bench/engine_step.py [--dtypes float32,bfloat16] [--views 128,256,512] [--repeats 15]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def cpu_flags() -> str:
    """The CPU's vector extensions that XLA:CPU's kernels care about (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + ",".join(wanted)


def time_steps(engine, b: int, view: int, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of `engine`'s decode step of its first `b` slots over `view`
    columns, each to its tokens on the host (run under the model's mesh context)."""
    from nvlm_jax.serve import engine as engine_lib

    model = engine.model
    tokens = np.ones((b,), np.int32)
    positions = np.full((b,), view - 10, np.int32)  # every slot near the view's end
    rows, active = engine._rows([None] * b), np.ones((b,), bool)
    times = []
    for i in range(3 + repeats):  # 3 to compile and warm up
        start = time.perf_counter()
        new, engine._state = engine_lib._decode(model.params, engine._state, tokens, positions, active, rows,
                                                cfg=model.config, view=view)
        np.asarray(new)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--views", default="128,256,512")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    from bench.serve import build_model
    from nvlm_jax.generate import mesh_context
    from nvlm_jax.serve.engine import Engine

    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"flags: {cpu_flags()}, load average {os.getloadavg()}")
    print(f"# python bench/engine_step.py {' '.join(sys.argv[1:])}")
    print("| dtype | slots stepped | view | step median ms | best ms |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        model, _ = build_model("126m", dtype)
        engine = Engine(model, max_batch=args.slots, max_len=args.max_len)
        with mesh_context(model.mesh, model.rules):
            for b in sorted({args.slots, 1}, reverse=True):
                for view in map(int, args.views.split(",")):
                    median, best = time_steps(engine, b, view, args.repeats)
                    print(f"| {dtype} | {b} | {view} | {1e3 * median:.1f} | {1e3 * best:.1f} |", flush=True)
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
