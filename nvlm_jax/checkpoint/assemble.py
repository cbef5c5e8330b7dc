"""Assembly: a standalone InternViT + a standalone Qwen2/Llama LM -> a converted NVLM folder
with a freshly initialised projector (and, for X/H, cross-attention blocks): the starting point
of stage-1 training. Same plan, checks and writers as the release import."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nvlm_jax.checkpoint.folders import HF_CONFIG_FILE, read_json
from nvlm_jax.checkpoint.hf_folder import (
    SafetensorsCheckpoint,
    detect_layout,
    infer_dummy_heads,
    open_safetensors,
    refuse_pickles,
    tokenizer_special_ids,
)
from nvlm_jax.checkpoint.paths import check_apart, local_path
from nvlm_jax.checkpoint.plan import Source, abstract_shapes, finish_plan, with_dummy_heads
from nvlm_jax.checkpoint.restore import float_dtype, with_dtype
from nvlm_jax.checkpoint.writers import write_plan
from nvlm_jax.config import NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules

# ---- assembly: standalone InternViT + standalone LLM → NVLM -------------------------------------


def _standalone(folder: Path, want: str) -> tuple[dict, SafetensorsCheckpoint, list[str]]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    refuse_pickles(folder)
    hf_cfg = read_json(folder / HF_CONFIG_FILE)
    layout = detect_layout(hf_cfg, str(folder / HF_CONFIG_FILE))
    if layout != want:
        raise ValueError(f"{folder}: expected a standalone {want} checkpoint, {HF_CONFIG_FILE} describes {layout}")
    ckpt, problems = open_safetensors(folder)
    return hf_cfg, ckpt, problems


def assembled_config(
    vit_config: Mapping[str, Any],
    llm_config: Mapping[str, Any],
    *,
    arch: str = "D",
    vit_dummy_heads: int = 0,
    image_context_token_id: int,
    xattn_every: int | None = None,
    downsample_ratio: float = 0.5,
) -> NVLMConfig:
    """Our config for a new NVLM model from an InternViT and an LLM `config.json` (read through
    the same code as the release config, so field meanings cannot drift)."""
    synthetic = {
        "model_type": "NVLM_D",
        "vision_config": dict(vit_config),
        "llm_config": dict(llm_config),
        "downsample_ratio": downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "chatml",
    }
    base = NVLMConfig.from_hf(synthetic, arch="D", image_context_token_id=image_context_token_id)
    vision: VisionConfig = dataclasses.replace(base.vision, num_dummy_heads=vit_dummy_heads)
    projector = ProjectorConfig(
        input_size=base.projector.input_size,
        hidden_size=base.llm.intermediate_size,
        output_size=base.llm.hidden_size,
        num_layers=1 if arch == "X" else 2,
    )
    if arch in ("X", "H") and xattn_every is None:
        xattn_every = max(1, base.llm.num_layers // 10)  # the paper's 10 cross-attention blocks
    return base.replace(arch=arch, vision=vision, projector=projector,
                        xattn_every=xattn_every if arch in ("X", "H") else None)


def fresh_params(cfg: NVLMConfig, names: Sequence[str], seed: int) -> dict[str, Any]:
    """Freshly initialised top-level param groups `names` (projector; X/H: the cross-attention
    blocks) by the model's own initialisers, without initialising the ViT or the LLM: `init`
    runs only the projector, so of the submodules only it and the params `setup` declares
    directly are created."""
    feats = jnp.zeros((1, 1, cfg.projector.input_size), jnp.float32)

    def init(key, x):
        return nvlm_model.NVLM(cfg).init(key, x, method=lambda m, f: m.projector(f))["params"]

    params = nn.meta.unbox(jax.jit(init)(jax.random.key(seed), feats))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"cannot initialise the {missing} params of arch {cfg.arch!r} on their own")
    return {n: jax.tree_util.tree_map(np.asarray, params[n]) for n in names}


def assemble(
    vit_dir: str | os.PathLike,
    llm_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "D",
    dtype: str = "bfloat16",
    seed: int = 0,
    vit_dummy_heads: int = 0,
    image_context_token_id: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    check_finite: bool = True,
) -> Path:
    """Builds a fresh NVLM checkpoint from a standalone InternViT (OpenGVLab safetensors layout:
    `embeddings.*`, `encoder.layers.*`) and a standalone Qwen2/Llama causal LM (HF layout); every
    other param (the projector) is freshly initialised from `seed`. Tokenizer files come from
    the LLM folder, whose `<|vision_pad|>` becomes the image context token unless
    `image_context_token_id` is given. `vit_dummy_heads` pads the ViT with zero heads (7 turns
    25 heads into the release's 32). `mesh`: write the sharded layout of that mesh, as in
    `convert_sharded` (every process calls this). `check_finite`: `NonFiniteError` naming the
    first NaN/Inf source tensor. ValueError, before anything is read, when `out_dir` is, holds
    or lies inside either source folder."""
    check_apart(out_dir, {"ViT folder": vit_dir, "LLM folder": llm_dir})
    float_dtype(dtype)
    vit_folder, llm_folder = local_path(vit_dir, "the ViT folder"), local_path(llm_dir, "the LLM folder")
    vit_hf, vit_ckpt, problems = _standalone(vit_folder, "internvit")
    llm_hf, llm_ckpt, llm_problems = _standalone(llm_folder, "llm")
    problems += llm_problems
    if image_context_token_id is None:
        special = tokenizer_special_ids(llm_folder)
        if special is None:
            raise ValueError(
                f"{llm_folder}: no tokenizer files to read <|vision_pad|> from; pass image_context_token_id"
            )
        image_context_token_id = special.vision_pad
    cfg = assembled_config(vit_hf, llm_hf, arch=arch, vit_dummy_heads=vit_dummy_heads,
                           image_context_token_id=image_context_token_id)
    vit_src = with_dummy_heads(cfg, infer_dummy_heads(vit_ckpt, cfg, "") or 0)
    target = with_dtype(cfg, dtype)
    shapes = abstract_shapes(target)
    sources = [Source("internvit", vit_ckpt, vit_src, ("vision",)), Source("llm", llm_ckpt, cfg, ("llm",))]
    fresh_names = [k for k in shapes if k not in ("vision", "llm")]
    fresh = fresh_params(target, fresh_names, seed)
    extra = {}
    for name, group in fresh.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(group)[0]:
            extra[(name,) + tuple(str(getattr(k, "key", k)) for k in kp)] = np.asarray(leaf)
    plan = finish_plan(sources, target, problems, [llm_folder], progress, f"{vit_folder} + {llm_folder}", extra,
                       check_finite)
    source = {"vit_dir": str(vit_folder.absolute()), "llm_dir": str(llm_folder.absolute()), "arch": arch,
              "dtype": jnp.dtype(dtype).name, "fresh": fresh_names, "seed": seed}
    return write_plan(plan, out_dir, overwrite, source, mesh, rules)


