"""Training metrics: throughput/MFU arithmetic and one logger that writes every record to the
console (a tqdm progress bar), a JSONL file and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nvlm_jax.records import METRICS_FILE, read_jsonl  # noqa: F401  (read_jsonl: re-exported for callers)
from nvlm_jax.train.tensorboard import EventWriter

TENSORBOARD_DIR = "tensorboard"


def batch_token_counts(batch: Mapping[str, np.ndarray], image_context_token_id: int,
                       tokens_per_tile: int) -> tuple[int, int]:
    """(text tokens, image tokens) of a host batch: text = real decoder tokens other than image
    context tokens; image = valid tiles × tokens per tile (what the projector emits)."""
    real = np.asarray(batch["segment_ids"]) > 0
    text = int(np.sum(real & (np.asarray(batch["input_ids"]) != image_context_token_id)))
    image = int(np.sum(np.asarray(batch["tile_valid"]))) * tokens_per_tile
    return text, image


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (0 when unknown)."""
    if seconds <= 0 or not peak_flops_per_s:
        return 0.0
    return flops / seconds / peak_flops_per_s


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def _drop_records_after(path: Path, step: int) -> None:
    """Removes the records of steps after `step` (logged by a run that died before its next
    checkpoint; the resumed run logs those steps again), so every step appears once. The file
    is replaced atomically; a torn last line is dropped too."""
    if not path.exists():
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class MetricsLogger:
    """Writes metric records `{name: number}` at a step to all sinks.

    Args:
      workdir: `metrics.jsonl` is appended to and `tensorboard/` gets a new event file.
      total_steps: length of the progress bar; `initial_step` where a resumed run starts.
      console: show the tqdm bar (postfix = the latest train metrics) and print eval records.
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0, console: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.workdir / METRICS_FILE, initial_step)
        self._jsonl = open(self.workdir / METRICS_FILE, "a")
        self._tb = EventWriter(self.workdir / TENSORBOARD_DIR)
        self._bar = None
        if console:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        """Logs `values` under `prefix/` at `step` (JSONL record also gets `step`, `time`)."""
        record = {"step": int(step), "time": time.time(), **{f"{prefix}/{k}": _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {f"{prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float, np.generic, np.ndarray)) and np.ndim(v) == 0}
        self._tb.scalars(step, numbers)
        self._tb.flush()
        if self._bar is not None:
            if prefix == "train":
                short = {k: f"{float(v):.4g}" for k, v in values.items() if k in ("loss", "accuracy", "lr", "mfu")}
                self._bar.set_postfix(short, refresh=False)
            else:
                self._bar.write(f"step {step} {prefix}: " + ", ".join(f"{k}={_plain(v)}" for k, v in values.items()))

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step`."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


class NullLogger:
    """`MetricsLogger`'s interface, writing nothing: the logger of processes other than 0 in a
    multi-process run (they compute the same metrics; one copy of the logs is enough)."""

    def write(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        del step, values, prefix

    def advance(self, step: int) -> None:
        del step

    def close(self) -> None:
        pass


def measure_peak_flops(size: int = 2048, repeats: int = 5, device=None) -> float:
    """Measured FLOP/s of one device on a `size`³ bf16×bf16→f32 matmul (best of `repeats`):
    the denominator of MFU when the hardware peak is not given."""
    import jax
    import jax.numpy as jnp

    device = device or jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 only
    # Its own one-device mesh: under the training loop's global mesh, jit would place the
    # operands on every process's devices.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("device",))):
        rng = np.random.default_rng(0)
        a, b = (jax.device_put(rng.standard_normal((size, size), np.float32).astype(jnp.bfloat16), device)
                for _ in range(2))
        matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        matmul(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
