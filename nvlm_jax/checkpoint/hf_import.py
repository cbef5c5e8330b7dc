"""Importing an NVLM-D Hugging Face release folder: into a converted folder (`convert`, streamed
through one host; `convert_sharded`, every process of a job writing its own shards) or straight
onto devices (`load_hf_params`). All three run the same validated plan (`plan.plan_nvlm`).

Dtypes: tensors are cast to the target dtype with round-to-nearest-even (the release stores
some tensors in float32 and loads them with `torch_dtype=bfloat16`; we do the same cast).
Dummy ViT heads (25 real heads padded to 32 in the release) are verified to be exactly zero;
by default the padded layout is kept (32 heads shard 8 ways), `drop_dummy_heads=True` slices
them away (exact, since they are zero). Pickled weights (`.bin`, `.pt`, ...) are never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nvlm_jax import weight_map as wm
from nvlm_jax.checkpoint.paths import check_apart
from nvlm_jax.checkpoint.plan import plan_nvlm
from nvlm_jax.checkpoint.quantized import quantize_plan
from nvlm_jax.checkpoint.restore import param_shardings
from nvlm_jax.checkpoint.writers import ShardedWrite, write_plan, write_plan_sharded
from nvlm_jax.config import NVLMConfig
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    drop_dummy_heads: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    check_finite: bool = True,
    quantize: str | None = None,
) -> Path:
    """Converts an NVLM-D Hugging Face folder into our Orbax checkpoint folder `out_dir`.

    Args:
      hf_dir: folder with `config.json`, safetensors shards (+ index) and tokenizer files.
      out_dir: destination; created atomically (temporary sibling folder, renamed at the end).
      dtype: storage dtype of the converted params (round-to-nearest-even casts).
      drop_dummy_heads: slice the (verified zero) dummy ViT heads away instead of keeping the
        release's padded head layout.
      overwrite: replace an existing `out_dir`.
      progress: draw a tqdm bar (bytes and tensors).
      mesh: None: stream the params through host memory one slab at a time (one process).
        A mesh: `convert_sharded`, called by every process of the job.
      rules: logical-axis rules of the sharded layout.
      check_finite: raise `NonFiniteError` naming the first source tensor holding NaN or Inf
        (checked per slab while streaming; nothing is left behind).
      quantize: "int8" / "int4": store every Linear kernel quantized (`kernel_q` + `kernel_scale`,
        see `nvlm_jax.models.quantize`), quantized slab by slab while streaming; the folder's
        config records it, so it loads without re-quantizing. Not with `mesh`.

    Returns:
      `out_dir` as an absolute Path (its last file, `nvlm_manifest.json`, holds every file's
      sha256). Raises ValueError listing every problem of the source, and before anything is
      read when `out_dir` is, holds or lies inside `hf_dir`.
    """
    if mesh is not None and quantize is not None:
        raise ValueError("convert: quantize is done while streaming on one host; convert without a mesh "
                         "(the quantized folder restores onto any mesh)")
    if mesh is not None:
        return convert_sharded(hf_dir, out_dir, mesh, dtype=dtype, drop_dummy_heads=drop_dummy_heads,
                               overwrite=overwrite, progress=progress, rules=rules, check_finite=check_finite)[0]
    check_apart(out_dir, {"Hugging Face folder": hf_dir})
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress, check_finite)
    source = _convert_source(hf_dir, dtype, drop_dummy_heads)
    if quantize is not None:
        plan, source = quantize_plan(plan, quantize), dict(source, quantize=quantize)
    return write_plan(plan, out_dir, overwrite, source)


def _convert_source(hf_dir, dtype: str, drop_dummy_heads: bool, **extra) -> dict[str, Any]:
    return {"hf_dir": str(Path(hf_dir).absolute()), "layout": "nvlm", "dtype": jnp.dtype(dtype).name,
            "drop_dummy_heads": drop_dummy_heads, **extra}


def convert_sharded(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    *,
    dtype: str = "bfloat16",
    drop_dummy_heads: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    rules: LogicalRules = DEFAULT_RULES,
    check_finite: bool = True,
) -> tuple[Path, ShardedWrite]:
    """`convert` straight into the sharded layout of `mesh`; every process of the job calls it.

    Each process validates the source and the mesh (so all of them raise the same error before
    anything is written), reads only the blocks of each tensor its own devices hold and writes
    its own shards of one Orbax checkpoint; process 0 writes the metadata, config and tokenizer
    files and renames the staging folder into place. `out_dir` must be on a file system every
    process sees. The result restores onto any mesh (`load_our_params`).

    Returns `(out_dir, what this process read)`.
    """
    check_apart(out_dir, {"Hugging Face folder": hf_dir})
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress, check_finite)
    source = _convert_source(hf_dir, dtype, drop_dummy_heads, mesh=dict(mesh.shape), processes=jax.process_count())
    return write_plan_sharded(plan, out_dir, overwrite, source, mesh, rules)


def load_hf_params(
    hf_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    *,
    drop_dummy_heads: bool = False,
    progress: bool = False,
    rules: LogicalRules = DEFAULT_RULES,
    check_finite: bool = True,
    quantize: str | None = None,
) -> tuple[NVLMConfig, dict]:
    """Reads an NVLM-D Hugging Face folder straight into device arrays (no Orbax step).

    Params are assembled one at a time on the host and placed on `mesh` (or the first device),
    so host memory peaks near the largest (stacked) param. Returns `(config, params)`.
    `check_finite`: `NonFiniteError` naming the first NaN/Inf source tensor. `quantize` ("int8" /
    "int4"): Linear kernels are quantized slab by slab on the host before they reach a device.
    """
    plan = plan_nvlm(hf_dir, dtype, drop_dummy_heads, progress, check_finite)
    if quantize is not None:
        plan = quantize_plan(plan, quantize)
    shardings = param_shardings(plan.cfg, mesh, rules)
    try:
        flat = {path: jax.device_put(p.materialize(), wm.tree_get(shardings, path)) for path, p in plan.params.items()}
    finally:
        if plan.progress is not None:
            plan.progress.close()
    tree: dict = {}
    for path, arr in flat.items():
        wm.tree_set(tree, path, arr)
    return plan.cfg, tree


