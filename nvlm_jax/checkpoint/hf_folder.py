"""Reading a Hugging Face safetensors folder: shard headers cross-checked with the index, the
architecture its `config.json` describes, the dummy ViT heads its tensors imply, and the
tokenizer's special ids. Nothing here reads tensor data; pickled weights are refused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvlm_jax.checkpoint.folders import INDEX_FILE, SINGLE_FILE, read_json
from nvlm_jax.config import NVLMConfig
from nvlm_jax.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ---- reading a Hugging Face folder -------------------------------------------------------------


def refuse_pickles(folder: Path) -> None:
    """Raises ValueError when `folder`'s weights exist only as pickles (which we never load)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder}: weights are pickled ({', '.join(pickles[:4])}{', ...' if len(pickles) > 4 else ''}); "
            "nvlm_jax never unpickles checkpoints (unpickling runs arbitrary code). Convert them to "
            "safetensors first, in an environment you trust, e.g.:\n"
            "  python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"\n"
            "or load the model with transformers and call `save_pretrained(dir, safe_serialization=True)`."
        )


@dataclasses.dataclass
class SafetensorsCheckpoint:
    """The safetensors shards of one folder: which file holds each tensor.

    Attributes:
      folder: the checkpoint folder.
      files: shard file name → parsed file.
      key_to_file: tensor key → the file that holds it (as listed by the index, if any).
    """

    folder: Path
    files: dict[str, SafetensorsFile]
    key_to_file: dict[str, SafetensorsFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.info(k).nbytes for k, f in self.key_to_file.items())


def open_safetensors(folder: str | os.PathLike) -> tuple[SafetensorsCheckpoint, list[str]]:
    """Parses every shard header of `folder` and cross-checks them with the index.

    Returns the checkpoint (whatever could be opened) and the list of problems: missing shard
    files, truncated or corrupt shards, index entries whose shard lacks the tensor, tensors the
    index does not list, a tensor in two shards, shard names that are not plain file names
    inside `folder` (never opened), an index `metadata.total_size` other than the tensors'
    bytes. Refuses pickled weights (ValueError).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    refuse_pickles(folder)
    problems: list[str] = []
    index_path = folder / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        for key, name in weight_map.items():
            if not is_plain_file_name(name):
                shown = repr(name)[:80] if isinstance(name, str) else f"a {type(name).__name__}"
                problems.append(f"the index maps {key!r} to {shown}, which is not a file name inside {folder} "
                                "(a path, '..' or not a string); it is never opened")
        names = sorted({name for name in weight_map.values() if is_plain_file_name(name)})
    elif (folder / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        if not names:
            raise ValueError(f"{folder}: no {INDEX_FILE} and no *.safetensors files")
    files: dict[str, SafetensorsFile] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            listed = sum(1 for v in (weight_map or {}).values() if v == name)
            problems.append(f"shard file {name} is missing (the index lists {listed} tensors in it)")
            continue
        try:
            files[name] = SafetensorsFile(path)
        except ValueError as e:
            problems.append(str(e))
    key_to_file: dict[str, SafetensorsFile] = {}
    if weight_map is not None:
        for key, name in weight_map.items():
            f = files.get(name)
            if f is None:
                continue
            if key not in f:
                problems.append(f"the index maps {key!r} to {name}, which does not hold that tensor")
                continue
            key_to_file[key] = f
        for name, f in files.items():
            for key in f.keys():
                if key not in weight_map:
                    problems.append(f"{name} holds {key!r}, which the index does not list")
                elif weight_map[key] != name:
                    problems.append(f"{key!r} is in {name} but the index says {str(weight_map[key])[:80]!r}")
        if not problems:
            _check_total_size(index.get("metadata"), key_to_file, problems)
    else:
        for name, f in files.items():
            for key in f.keys():
                if key in key_to_file:
                    problems.append(f"{key!r} is in both {key_to_file[key].path.name} and {name}")
                key_to_file[key] = f
    return SafetensorsCheckpoint(folder, files, key_to_file), problems


def is_plain_file_name(name) -> bool:
    """Whether `name` is a file name that stays inside its folder: a non-empty string without
    path separators, NUL, '.' or '..' (so a shard can never be read from elsewhere)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and os.path.basename(name) == name and not os.path.isabs(name))


def _check_total_size(metadata, key_to_file: Mapping[str, SafetensorsFile], problems: list[str]) -> None:
    """The index's `metadata.total_size` (when given) must be the listed tensors' bytes."""
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is None:
        return
    have = sum(f.info(k).nbytes for k, f in key_to_file.items())
    if isinstance(total, bool) or not isinstance(total, int | float) or total != have:
        shown = repr(total)[:40]
        problems.append(f"{INDEX_FILE}: metadata.total_size is {shown}, but its tensors hold {have} bytes")


def detect_layout(hf_config: Mapping[str, Any], source: str) -> str:
    """Which weight-map layout a HF `config.json` describes: "nvlm", "internvit" or "llm"."""
    model_type = hf_config.get("model_type")
    archs = list(hf_config.get("architectures") or [])
    if model_type == "NVLM_D" or "NVLM_D" in archs:
        return "nvlm"
    if "InternVisionModel" in archs or str(model_type).startswith("intern_vit"):
        return "internvit"
    if set(archs) & {"Qwen2ForCausalLM", "LlamaForCausalLM"}:
        return "llm"
    raise ValueError(
        f"{source}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
        "expected NVLM_D, InternVisionModel, Qwen2ForCausalLM or LlamaForCausalLM"
    )


def infer_dummy_heads(ckpt: SafetensorsCheckpoint, cfg: NVLMConfig, prefix: str) -> int | None:
    """Dummy ViT heads implied by the stored fused qkv rows (3 · total_heads · head_dim)."""
    f = ckpt.key_to_file.get(prefix + "encoder.layers.0.attn.qkv.weight")
    if f is None:
        return None
    rows = f.info(prefix + "encoder.layers.0.attn.qkv.weight").shape[0]
    total, rem = divmod(rows, 3 * cfg.vision.head_dim)
    if rem or total < cfg.vision.num_heads:
        return None  # reported as a shape problem by the plan
    return total - cfg.vision.num_heads


def tokenizer_special_ids(folder: Path):
    """The tokenizer's `SpecialTokens` if `folder` holds tokenizer files, else None."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    from nvlm_jax.processing import get_special_tokens, load_tokenizer

    return get_special_tokens(load_tokenizer(folder))

