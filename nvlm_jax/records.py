"""The metrics file of a training run: its name in the workdir and its reader (shared by the
training loop, which writes it, and by `nvlm_jax.visualize`, which plots it)."""

from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL file (a torn last line from a killed run is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
