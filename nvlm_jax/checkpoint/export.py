"""Export: our params -> a release-layout NVLM-D folder (sharded safetensors + index +
`config.json` [+ tokenizer files]) that `convert` and the release's PyTorch code read back; the
round trip convert -> export is bit-exact. The prompt format travels in `config.json`
(`max_dynamic_patch`, `use_thumbnail`, and the full record under `nvlm_jax_prompt_format`).

`config.json` carries the release's `auto_map`, pointing at the release's own modelling code
(by default in the `nvidia/NVLM-D-72B` repository, as `repo--module.Class`), so
`transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads an export like the
release. A model trained with LoRA adapters is exported with the adapters merged into its weights
(`merge_lora=True`): the release layout has no place for adapters.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax import weight_map as wm
from nvlm_jax.checkpoint.folders import HF_CONFIG_FILE, INDEX_FILE, Step
from nvlm_jax.checkpoint.paths import check_apart
from nvlm_jax.checkpoint.plan import with_dummy_heads, zero_view
from nvlm_jax.checkpoint.progress import Progress
from nvlm_jax.checkpoint.restore import HF_PROMPT_FORMAT_KEY, float_dtype, load_our_params, read_info
from nvlm_jax.checkpoint.writers import Staging, copy_tokenizer
from nvlm_jax.config import NVLM_VIT_DUMMY_HEADS, NVLMConfig
from nvlm_jax.models import lora as lora_lib
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.safetensors_io import SafetensorsWriter, TensorSpec

CHUNK_BYTES = 64 * 1024**2
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
RELEASE_REPO = "nvidia/NVLM-D-72B"
# The release's remote-code classes (its config.json `auto_map`).
RELEASE_CLASSES = {
    "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
    "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
    "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
}


def release_auto_map(remote_code_repo: str = RELEASE_REPO) -> dict[str, str]:
    """The `auto_map` of an exported config: the release's classes in `remote_code_repo`
    (`repo--module.Class`), or, with "", modules expected beside the weights."""
    prefix = f"{remote_code_repo}--" if remote_code_repo else ""
    return {auto: prefix + target for auto, target in RELEASE_CLASSES.items()}


def release_dummy_heads(cfg: NVLMConfig) -> int | None:
    """Dummy ViT heads the release's PyTorch code expects for `cfg`: the 25-head InternViT-6B is
    padded to 32 (7 zero heads); None (keep the params' layout) for any other ViT."""
    v = cfg.vision
    if v.num_heads == 25 and v.hidden_size == 3200 and v.num_dummy_heads != NVLM_VIT_DUMMY_HEADS:
        return NVLM_VIT_DUMMY_HEADS
    return None
# ---- export: our params → release-layout safetensors -------------------------------------------


def to_hf_config(cfg: NVLMConfig, torch_dtype: str = "bfloat16",
                 prompt_format: PromptFormat | None = None, remote_code_repo: str = RELEASE_REPO) -> dict[str, Any]:
    """A release-format (`NVLM_D`) `config.json` dict that `NVLMConfig.from_hf` reads back as `cfg`
    (up to the runtime-only fields: dtypes, attention/remat settings, the dummy-head count,
    which is re-derived from the weights, and the image token id, which comes from the tokenizer)."""
    if cfg.arch != "D":
        raise ValueError(f"only NVLM-D has a released Hugging Face layout; cannot export arch {cfg.arch!r}")
    m, v = cfg.llm, cfg.vision
    fmt = prompt_format or PromptFormat.for_model(cfg)
    if m.family == "qwen2" and not m.qkv_bias:
        raise ValueError("a qwen2-family LLM without q/k/v biases has no Hugging Face Qwen2 equivalent")
    llm = {
        "architectures": ["Qwen2ForCausalLM" if m.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": m.family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "attention_bias": m.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_word_embeddings,
        "max_position_embeddings": m.max_position_embeddings,
        "torch_dtype": torch_dtype,
    }
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "qk_normalization": v.qk_normalization,
        "qkv_bias": v.qkv_bias,
        "hidden_act": "gelu",
        "initializer_factor": v.layer_scale_init,
        "use_flash_attn": False,
        "torch_dtype": torch_dtype,
    }
    return {
        "architectures": ["NVLM_D"],
        "auto_map": release_auto_map(remote_code_repo),
        "model_type": "NVLM_D",
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "select_layer": v.select_layer,
        "template": cfg.template,
        "force_image_size": v.image_size,
        "dynamic_image_size": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": fmt.max_tiles,
        "use_thumbnail": fmt.use_thumbnail,
        "img_context_token_id": cfg.image_context_token_id,
        "torch_dtype": torch_dtype,
        "llm_config": llm,
        "vision_config": vision,
        HF_PROMPT_FORMAT_KEY: fmt.to_dict(),
    }


def _host_slice(param, index) -> np.ndarray:
    return np.asarray(jax.device_get(param[index] if index is not None else param))


def export_hf(
    params: Mapping,
    cfg: NVLMConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    vit_dummy_heads: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    prompt_format: PromptFormat | None = None,
    remote_code_repo: str = RELEASE_REPO,
) -> Path:
    """Writes our params as a release-layout NVLM-D folder (sharded safetensors + index +
    `config.json` [+ tokenizer files]) that `convert` (and the release's PyTorch code, for the
    72B head layout) reads back.

    Args:
      params: our params tree (jax or numpy arrays); read one layer slice at a time.
      cfg: their config.
      dtype: stored dtype of every tensor (default: each param's own dtype, so the round trip
        convert → export is bit-exact).
      vit_dummy_heads: zero ViT heads to pad to; default: 7 for the 25-head 72B ViT (what the
        release's PyTorch code expects), else `cfg`'s layout. Dropping heads checks they are zero.
      tokenizer_dir: where to copy tokenizer files from.
      max_shard_bytes: shard size limit (tensors are never split).
      remote_code_repo: where `auto_map` points for the release's modelling code ("" = beside
        the weights).
    """
    if lora_lib.has_adapters(params) or cfg.lora.rank:
        raise ValueError("these params hold LoRA adapters, which the release layout has no place for: merge them "
                         "first (lora.merge, or export_checkpoint / convert --export_from with merge_lora)")
    if vit_dummy_heads is None:
        vit_dummy_heads = release_dummy_heads(cfg)
    if dtype is not None:
        float_dtype(dtype)
    if tokenizer_dir is not None:
        check_apart(out_dir, {"tokenizer folder": tokenizer_dir})
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), dict(params))
    out_cfg = cfg if vit_dummy_heads is None else with_dummy_heads(cfg, vit_dummy_heads)
    out_heads = out_cfg.vision.total_heads
    slots = wm.layout_slots("nvlm", shapes)
    covered = {s.path for s in slots}
    leftover = [
        "/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
        if tuple(str(getattr(k, "key", k)) for k in kp) not in covered
    ]
    if leftover:
        raise ValueError(f"params {leftover} have no place in the NVLM-D release layout")

    def tensor(slot: wm.KeySlot) -> np.ndarray:
        x = _host_slice(wm.tree_get(params, slot.path), slot.layer)
        if slot.rule.part is not None:
            x = x[slot.rule.part]
        axis = wm.head_axis(slot.path, slot.rule.part)
        if axis is not None and x.shape[axis] > cfg.vision.num_heads:
            # The ViT masks its dummy heads' output, so whatever their weights hold (trained
            # adapters merged in move them) they are written as the release's zero heads.
            x = wm.resize_heads(x, axis, cfg.vision.num_heads)
        if axis is not None and x.shape[axis] != out_heads:
            x = wm.resize_heads(x, axis, out_heads)
        return np.asarray(slot.rule.transform.inverse(x, out_cfg))

    def hf_shape(slot: wm.KeySlot) -> tuple[int, ...]:
        leaf = wm.tree_get(shapes, slot.path)
        shape = tuple(leaf.shape[1:] if slot.layer is not None else leaf.shape)
        if slot.rule.part is not None:
            shape = zero_view(shape)[slot.rule.part].shape
        axis = wm.head_axis(slot.path, slot.rule.part)
        if axis is not None:
            shape = shape[:axis] + (out_heads,) + shape[axis + 1 :]
        return tuple(jax.eval_shape(lambda x: slot.rule.transform.inverse(x, out_cfg),
                                    jax.ShapeDtypeStruct(shape, np.float32)).shape)

    specs = [
        TensorSpec(s.key, hf_shape(s), np.dtype(dtype) if dtype else np.dtype(wm.tree_get(shapes, s.path).dtype))
        for s in slots
    ]
    shards: list[list[int]] = [[]]
    size = 0
    for i, spec in enumerate(specs):
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += spec.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = Progress(len(specs), sum(s.nbytes for s in specs), progress, desc="export")
    torch_dtype = jnp.dtype(dtype or cfg.param_dtype).name
    with Staging(out_dir, overwrite) as tmp:
        try:
            for name, members in zip(names, shards, strict=True):
                with SafetensorsWriter(tmp / name, [specs[i] for i in members], {"format": "pt"}) as w:
                    for i in members:
                        w.write(specs[i].key, tensor(slots[i]))
                        bar.update(specs[i].nbytes)
        finally:
            bar.close()
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {specs[i].key: name for name, members in zip(names, shards, strict=True) for i in members},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        hf_config = to_hf_config(out_cfg, torch_dtype, prompt_format, remote_code_repo)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer([Path(tokenizer_dir)], tmp)
    return Path(out_dir).absolute()


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: Step = "latest",
                      merge_lora: bool = False, **kwargs) -> Path:
    """`export_hf` of a converted folder or a training checkpoint (workdir: `step`, default the
    latest): its params in their stored dtype, its config, prompt format and tokenizer; a model
    with LoRA adapters needs `merge_lora` (folded into the weights in f32, then stored).
    ValueError, before anything is read, when `out_dir` is, holds or lies inside `ckpt_dir`."""
    check_apart(out_dir, {"checkpoint": ckpt_dir})
    info = read_info(ckpt_dir, step)
    if info.located.kind == "hf":
        raise ValueError(f"{info.located.path}: already a Hugging Face folder, nothing to export")
    if info.config.lora.rank and not merge_lora:
        raise ValueError(f"{info.located.path}: the model has LoRA adapters (rank {info.config.lora.rank}); the "
                         "release layout has no place for them: export with merge_lora (--merge_lora)")
    params = load_our_params(info.located, info.config)
    cfg = info.config
    if cfg.lora.rank:
        params, cfg = lora_lib.merge(params, cfg)
    kwargs.setdefault("prompt_format", info.prompt_format)
    if "tokenizer_dir" in kwargs or info.tokenizer is None:
        return export_hf(params, cfg, out_dir, **kwargs)
    if info.tokenizer != "tiny":
        return export_hf(params, cfg, out_dir, tokenizer_dir=info.tokenizer, **kwargs)
    from nvlm_jax.processing.tokenizer import make_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tok:
        return export_hf(params, cfg, out_dir, tokenizer_dir=make_tiny_tokenizer(tok), **kwargs)
