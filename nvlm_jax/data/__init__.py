"""Grain data pipelines: sources, synthetic tasks, per-sample transforms, mixing, packing, batches.

Entry point: `make_pipeline(DataConfig(...), model_cfg, tokenizer, split=..., seed=..., batch_size=...,
seq_len=..., tiles_per_row=...)`; the batch contract is in `batch.py`.

Names are imported lazily, so `from nvlm_jax.data import batch` does not import grain (~2 s).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FIELDS": "batch",
    "validate_batch": "batch",
    "check_batch_semantics": "batch",
    "SkipRateExceeded": "mixture",
    "DataConfig": "pipeline",
    "DataIterator": "pipeline",
    "config_for_tokenizer": "pipeline",
    "make_dataset": "pipeline",
    "make_pipeline": "pipeline",
    "synthetic_data_config": "pipeline",
    "ArrayRecordSource": "sources",
    "JsonlSource": "sources",
    "SyntheticSource": "sources",
    "TfdsSource": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nvlm_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nvlm_jax.data.{module}"), name)
