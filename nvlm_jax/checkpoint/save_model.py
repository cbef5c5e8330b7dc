"""Saving a loaded `NVLMModel` as a converted folder (`nvlm_config.json` + Orbax `params/` +
tokenizer files + sha256 manifest), e.g. after `quantize_gptq`: `load_pretrained`, `chat`,
`eval` and `serve` read it back as stored (quantized params load without re-quantizing)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nvlm_jax.checkpoint import restore as restore_lib
from nvlm_jax.checkpoint.plan import ArrayParam, ConversionPlan
from nvlm_jax.checkpoint.writers import write_plan


def _stacked(params: dict[str, Any], cfg):
    """Host copies of `params` with per-layer decoder layers (`layer_{i}`) stacked back into
    `layers`, the layout folders store; `(cfg, params)`."""
    host = jax.tree_util.tree_map(np.asarray, params)
    if cfg.layer_layout == "stacked":
        return cfg, host
    llm = dict(host["llm"])
    layers = [llm.pop(f"layer_{i}") for i in range(cfg.llm.num_layers)]
    llm["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    return cfg.replace(layer_layout="stacked"), dict(host, llm=llm)


def save_model(model, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `model` (its params as they are: dtype, quantization) as a converted folder at
    `out_dir` (atomically; an existing `out_dir` is an error unless `overwrite`). Host memory
    holds the whole params once. The tokenizer is the one `model` was loaded with (the built-in
    tiny one is written out as files); a model without one is saved without."""
    from nvlm_jax.processing.tokenizer import TINY_SPEC, make_tiny_tokenizer

    cfg, params = _stacked(model.params, model.config)
    paths = [(tuple(str(k.key) for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)]
    flat = {path: ArrayParam(path, leaf) for path, leaf in paths}
    spec = restore_lib.read_info(model.source).tokenizer if model.source is not None else None
    source = {"saved_from": None if model.source is None else os.fspath(model.source.path)}
    with tempfile.TemporaryDirectory(prefix="nvlm_tokenizer_") as tiny:
        folders = [] if spec is None else [make_tiny_tokenizer(tiny) if spec == TINY_SPEC else Path(spec)]
        plan = ConversionPlan(cfg, flat, folders, total_bytes=sum(p.array.nbytes for p in flat.values()),
                              total_tensors=len(flat), prompt_format=model.prompt_format)
        return write_plan(plan, out_dir, overwrite, source)
