"""Checkpoint folder -> config, prompt format, tokenizer spec -> abstract params -> params
restored sharded onto a mesh. Written once, for every kind `folders.locate` recognises that
holds Orbax params: converted folders (`params/`), training checkpoints (`state/`, params under
"params") and, for the training launcher's init, a bare Orbax params folder with a config JSON.
(A Hugging Face folder is read by `hf_import.load_hf_params`, through the same shardings.)

Restores take a target tree of `jax.ShapeDtypeStruct`s (shape, dtype to cast to, sharding), so a
checkpoint written on one mesh restores onto any other (each device reads only its blocks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nvlm_jax.checkpoint import folders, frozen_base
from nvlm_jax.checkpoint.folders import (
    FORMAT,
    FORMAT_VERSION,
    HF_CONFIG_FILE,
    OUR_CONFIG_FILE,
    Located,
    Step,
    locate,
    read_json,
    read_run_config,
)
from nvlm_jax.checkpoint.paths import as_path, orbax_dir
from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.processing.prompt_format import DEFAULT_SYSTEM_MESSAGE, PromptFormat
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, tree_shardings

HF_PROMPT_FORMAT_KEY = "nvlm_jax_prompt_format"  # our full record inside an exported config.json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, without reading weights.

    Attributes:
      located: the folder and its kind (`folders.locate`).
      config: the model config (for a Hugging Face folder, `NVLMConfig.from_hf`: the release's
        7 dummy ViT heads assumed; the import refines it from the tensors and the tokenizer).
      prompt_format: the format the model was trained / released with.
      tokenizer: the tokenizer spec: "tiny" (the built-in one) or a folder; None when there is none.
      run_config: a training checkpoint's saved run config, else None.
    """

    located: Located
    config: NVLMConfig
    prompt_format: PromptFormat
    tokenizer: str | None
    run_config: dict[str, Any] | None = None


# ---- configs ---------------------------------------------------------------------------------------


def _our_config_data(folder: str | os.PathLike) -> dict[str, Any]:
    path = as_path(folder) / OUR_CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an nvlm_jax checkpoint config (format != {FORMAT!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data['format_version']} is newer than this code ({FORMAT_VERSION})")
    return data


def read_our_config(ckpt_dir: str | os.PathLike) -> NVLMConfig:
    """The `NVLMConfig` stored in a converted folder."""
    return NVLMConfig.from_dict(_our_config_data(ckpt_dir)["config"])


def read_model_config_json(path: str | os.PathLike) -> NVLMConfig:
    """An `NVLMConfig` from JSON: the converter's `{"config": {...}}` file or a bare config dict."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    try:
        return NVLMConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an NVLMConfig: {e}") from e


def run_prompt_format(run_config: Mapping[str, Any], cfg: NVLMConfig, where: str = "run config") -> PromptFormat:
    """The prompt format of a training run: its saved "prompt_format", or (checkpoints written
    before it was saved) the model's format with the run's `data.tag_style`, `data.max_tiles`
    and `data.system_message`."""
    if "prompt_format" in run_config:
        return PromptFormat.from_dict(run_config["prompt_format"], where=f"{where}: prompt_format")
    d = run_config.get("data") or {}
    system = d.get("system_message", DEFAULT_SYSTEM_MESSAGE)
    return PromptFormat.for_model(cfg, tag_style=d.get("tag_style", "1d"),
                                  max_tiles=d.get("max_tiles", 0) or cfg.max_tiles, system_message=system or None)


def hf_prompt_format(hf_config: Mapping[str, Any], cfg: NVLMConfig) -> PromptFormat:
    """The prompt format of a Hugging Face folder: the release's, with its `max_dynamic_patch`
    and `use_thumbnail` (in `cfg`), or the full record an export wrote."""
    if HF_PROMPT_FORMAT_KEY in hf_config:
        return PromptFormat.from_dict(hf_config[HF_PROMPT_FORMAT_KEY], where=f"config.json: {HF_PROMPT_FORMAT_KEY}")
    return PromptFormat.for_model(cfg)


def read_info(path: str | os.PathLike | Located, step: Step = "latest") -> CheckpointInfo:
    """The config, prompt format and tokenizer spec of any checkpoint `locate` recognises."""
    loc = path if isinstance(path, Located) else locate(path, step)
    if loc.kind == "hf":
        hf = read_json(loc.root / HF_CONFIG_FILE)
        if not isinstance(hf, dict):
            raise ValueError(f"{loc.root / HF_CONFIG_FILE}: not a JSON object")
        cfg = NVLMConfig.from_hf(hf)
        tok = os.fspath(loc.root) if folders.has_tokenizer(loc.root) else None
        return CheckpointInfo(loc, cfg, hf_prompt_format(hf, cfg), tok)
    if loc.kind == "converted":
        data = _our_config_data(loc.root)
        cfg = NVLMConfig.from_dict(data["config"])
        fmt = (PromptFormat.from_dict(data["prompt_format"], where=f"{loc.root / OUR_CONFIG_FILE}: prompt_format")
               if "prompt_format" in data else PromptFormat.for_model(cfg))
        tok = os.fspath(loc.root) if folders.has_tokenizer(loc.root) else None
        return CheckpointInfo(loc, cfg, fmt, tok)
    run = read_run_config(loc.step_dir)
    where = f"{loc.step_dir / folders.RUN_CONFIG_ITEM}"
    if not isinstance(run.get("model"), dict):
        raise ValueError(f"{where}: the saved run config has no 'model' entry")
    try:
        cfg = NVLMConfig.from_dict(run["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the saved model config is not an NVLMConfig: {e}") from e
    return CheckpointInfo(loc, cfg, run_prompt_format(run, cfg, where), tokenizer_spec(run), run)


def tokenizer_spec(run_config: Mapping[str, Any], _depth: int = 0) -> str | None:
    """A run's tokenizer spec: `tokenizer` ("tiny" or a folder), else its init checkpoint's: for
    a run initialised from another run (a fine-tune), that run's spec; otherwise the folder."""
    spec = run_config.get("tokenizer") or ""
    if not spec:
        init = run_config.get("init") or {}
        spec = init.get("checkpoint") or ""
        if spec and _depth < 8:  # a chain of fine-tunes; the bound stops a run that names itself
            try:
                loc = locate(spec)
            except (ValueError, OSError):
                return spec
            if loc.kind in ("workdir", "step"):
                return tokenizer_spec(read_run_config(loc.step_dir), _depth + 1)
    return spec or None


def read_config(path: str | os.PathLike, step: Step = "latest") -> NVLMConfig:
    """The model config of any checkpoint (see `read_info`), without reading weights."""
    return read_info(path, step).config


def float_dtype(dtype) -> str:
    """The name of floating-point `dtype` ("bf16" -> "bfloat16"); ValueError for anything else
    (an integer or bool dtype would silently truncate every weight)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a dtype; use a floating-point one such as bfloat16 or "
                         "float32") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype {dt.name} is not a floating-point dtype; params are stored as floats (use "
                         "bfloat16, float16 or float32)")
    return dt.name


def with_dtype(cfg: NVLMConfig, dtype: str) -> NVLMConfig:
    """`cfg` stored and computed in floating-point `dtype` (ValueError for any other)."""
    name = float_dtype(dtype)
    return cfg.replace(dtype=name, param_dtype=name)


# ---- params ----------------------------------------------------------------------------------------


def param_shardings(cfg: NVLMConfig, mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES):
    """Target shardings of our params: by the logical rules on `mesh`, else the first device."""
    abstract = nvlm_model.abstract_params(cfg)
    if mesh is None:
        from flax import linen as nn

        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(abstract))
    return tree_shardings(abstract, mesh, rules)


def param_target(cfg: NVLMConfig, mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES):
    """The abstract params of `cfg`: `ShapeDtypeStruct`s in `cfg.param_dtype` with their shardings
    (quantized kernels keep their integer values and float32 scales)."""
    from flax import linen as nn

    from nvlm_jax.models.quantize import QUANT_LEAVES

    # Not nn.meta.unbox: under the training loop's mesh it would constrain the abstract shapes (and fail).
    shapes = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                    nvlm_model.abstract_params(cfg),
                                    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    dtype = jnp.dtype(cfg.param_dtype)

    def target(path, s, sh):
        keep = str(getattr(path[-1], "key", path[-1])) in QUANT_LEAVES
        return jax.ShapeDtypeStruct(s.shape, s.dtype if keep else dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(target, shapes, param_shardings(cfg, mesh, rules))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _prune(tree):
    """Drops None entries (and dicts left empty) from nested dicts."""
    if isinstance(tree, Mapping):
        out = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def _stored_leaves(ckptr, directory) -> dict[str, Any]:
    """{"a/b/c": array metadata} of the leaves an Orbax PyTree checkpoint holds."""
    meta = ckptr.metadata(orbax_dir(directory))
    stored = getattr(meta, "item_metadata", meta)
    stored = getattr(stored, "tree", stored)
    return {_path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(stored)}


def restore_params(
    directory: str | os.PathLike, target: Any, *, allow_missing: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Restores a params tree from an Orbax PyTree checkpoint folder (a converted folder's
    `params/`, a training checkpoint's `state/` with `target = {"params": ...}`, or any
    `StandardCheckpointer` save of a params dict).

    Args:
      directory: the Orbax checkpoint folder.
      target: tree of `jax.ShapeDtypeStruct` (shape, dtype to cast to, sharding to place on).
      allow_missing: when True, target leaves absent from the checkpoint are left out of the
        result (the caller initialises them); when False they are an error.

    Returns:
      (params holding every restored leaf, sorted list of the missing leaf paths "a/b/c").

    Raises ValueError listing every problem at once: missing leaves (unless allowed) and shape
    mismatches (FileNotFoundError when the folder does not exist). Leaves in the checkpoint that
    the target lacks are ignored.
    """
    import orbax.checkpoint as ocp

    directory = orbax_dir(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"params checkpoint folder {directory} does not exist")
    with ocp.PyTreeCheckpointer() as ckptr:
        stored_leaves = _stored_leaves(ckptr, directory)
        problems, missing = [], []

        def keep(path, t):
            name = _path_str(path)
            if name not in stored_leaves:
                missing.append(name)
                return None
            shape = tuple(stored_leaves[name].shape)
            if shape != tuple(t.shape):
                hint = ""
                if name.endswith("kernel_q") and sorted(shape) == sorted(t.shape):
                    hint = (" (quantized weights stored in-major, as `convert --quantize` wrote them before "
                            "2026-12-05: convert the float checkpoint again)")
                problems.append(f"{name}: checkpoint shape {shape} != expected {tuple(t.shape)}{hint}")
            return t

        subset = _prune(jax.tree_util.tree_map_with_path(keep, target))
        if missing and not allow_missing:
            problems.append(f"missing from the checkpoint: {sorted(missing)}")
        if problems:
            raise ValueError(f"{directory}: cannot restore params for this config: " + "; ".join(problems))
        restore_args = jax.tree_util.tree_map(
            lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape), subset
        )
        params = ckptr.restore(
            directory,
            args=ocp.args.PyTreeRestore(item=subset, restore_args=restore_args, partial_restore=True),
        )
    return params, sorted(missing)


def load_params(
    located: Located | str | os.PathLike,
    cfg: NVLMConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    allow_missing: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The params of a converted folder or a training checkpoint, cast to `cfg.param_dtype` and
    placed on `mesh` (or the first device); `(params, missing leaf paths)` as `restore_params`."""
    loc = located if isinstance(located, Located) else locate(located)
    target = param_target(cfg, mesh, rules)
    if loc.kind == "converted":
        return restore_params(loc.params_dir, target, allow_missing=allow_missing)
    if loc.is_training:
        run = read_run_config(loc.step_dir)
        if frozen_base.RECORD_KEY in run:
            return _load_lora_checkpoint(loc, run, cfg, target, mesh, rules), []
        params, missing = restore_params(loc.params_dir, {"params": target}, allow_missing=allow_missing)
        return params.get("params", {}), [m.removeprefix("params/") for m in missing]
    raise ValueError(f"{loc.path}: a {loc.describe()} holds no Orbax params (import it with nvlm_jax.convert, "
                     "or load it with nvlm_jax.load_pretrained)")


def _load_lora_checkpoint(loc: Located, run: Mapping[str, Any], cfg: NVLMConfig, target, mesh, rules) -> dict:
    """The full params of a LoRA training checkpoint that holds only its trainable params: the
    frozen base re-created from the run's recorded init source (checked against its recorded
    fingerprint, in the run's own dtypes), cast to `target`'s, plus the saved params."""
    import orbax.checkpoint as ocp

    record, where = run[frozen_base.RECORD_KEY], str(loc.step_dir)
    try:
        train_cfg = NVLMConfig.from_dict(run["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: the saved run config has no readable model config: {e}") from e
    if train_cfg.lora != cfg.lora:
        raise ValueError(f"{where}: the run trained LoRA adapters {train_cfg.lora}, the model config asks for "
                         f"{cfg.lora}")
    directory = as_path(loc.params_dir)
    with ocp.PyTreeCheckpointer() as ckptr:
        saved = {p.removeprefix("params/") for p in _stored_leaves(ckptr, directory) if p.startswith("params/")}
    try:
        full = run_init_params(record.get("init") or {}, int(record.get("seed", 0)), train_cfg, mesh, rules)
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: this LoRA checkpoint holds only its trainable params; its frozen base comes "
                         f"from {frozen_base.describe(record)}, which cannot be read: {e}") from e
    frozen = frozen_base.select(full, saved, keep=False)
    frozen_base.check(record, frozen, where)
    expected = set(frozen_base.leaf_paths(target))
    odd = sorted(saved - expected)
    if odd:
        raise ValueError(f"{where}: saved params {odd[:5]} are not params of this model config")
    params, _ = restore_params(directory, {"params": frozen_base.select(target, saved)})
    kinds = frozen_base.select(target, saved, keep=False)
    if set(frozen_base.leaf_paths(kinds)) != set(frozen_base.leaf_paths(frozen)):
        diff = sorted(set(frozen_base.leaf_paths(kinds)) ^ set(frozen_base.leaf_paths(frozen)))
        raise ValueError(f"{where}: the re-created base and this model config differ in params {diff[:5]}")
    frozen = jax.tree_util.tree_map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), frozen, kinds)
    return frozen_base.overlay(frozen, params.get("params", {}))


def load_our_params(
    ckpt_dir: str | os.PathLike,
    cfg: NVLMConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
):
    """The complete params of a converted folder or training checkpoint (see `load_params`)."""
    return load_params(ckpt_dir, cfg, mesh, rules)[0]


# ---- the training launcher's init ----------------------------------------------------------------


def _is_orbax_tree(path) -> bool:
    p = as_path(path)
    return p.is_dir() and ((p / "_METADATA").is_file() or (p / "manifest.ocdbt").is_file()
                           or (p / "_CHECKPOINT_METADATA").is_file())


def init_source(checkpoint: str | os.PathLike, config_json: str | os.PathLike | None = None
                ) -> tuple[Located | None, NVLMConfig]:
    """What a training run initialises from: `(located, model config)` of a converted folder or
    a training workdir / step (their own config unless `config_json` overrides it), or
    `(None, config)` of a bare Orbax params folder, which needs `config_json`."""
    try:
        loc = locate(checkpoint)
    except folders.CheckpointNotFoundError:
        raise
    except ValueError:
        if not _is_orbax_tree(checkpoint):
            raise
        if not config_json:
            raise ValueError(f"init checkpoint {checkpoint} is a bare Orbax params folder (no "
                             f"{OUR_CONFIG_FILE}); set init.config_json to its model config") from None
        return None, read_model_config_json(config_json)
    if loc.kind == "hf":
        raise ValueError(f"init checkpoint {checkpoint} is a Hugging Face folder; convert it first "
                         "(python -m nvlm_jax.convert --hf_dir=... --out_dir=...)")
    cfg = read_model_config_json(config_json) if config_json else read_info(loc).config
    return loc, cfg


def run_init_params(init: Mapping[str, Any], seed: int, cfg: NVLMConfig, mesh: jax.sharding.Mesh | None,
                    rules: LogicalRules = DEFAULT_RULES) -> dict[str, Any]:
    """A training run's initial params, from its `init` section (`checkpoint`, `config_json`,
    `allow_missing`) and `seed`: the seeded random init without a checkpoint; else what the
    checkpoint holds (its own LoRA adapters, if it was LoRA-tuned, folded into its weights;
    leaves it lacks freshly initialised when `allow_missing`), with fresh adapters when
    `cfg.lora.rank`. The launcher's init, and the re-creation of a LoRA checkpoint's base."""
    from nvlm_jax.models import lora as lora_lib

    checkpoint, config_json = init.get("checkpoint") or "", init.get("config_json") or None
    if not checkpoint:
        return nvlm_model.init_params(cfg, jax.random.key(seed), mesh, rules)
    _, source = init_source(checkpoint, config_json)
    base_cfg = cfg.replace(lora=source.lora)
    params, missing = init_params(checkpoint, base_cfg, mesh, config_json=config_json,
                                  allow_missing=bool(init.get("allow_missing", False)), rules=rules)
    if missing:
        log.warning("initialising %d params missing from %s: %s", len(missing), checkpoint, missing)
        fresh = nvlm_model.init_params(base_cfg, jax.random.key(seed), mesh, rules)
        params = frozen_base.overlay(fresh, params)
    if base_cfg.lora.rank:
        params, _ = lora_lib.merge(params, base_cfg)
    if cfg.lora.rank:
        params = lora_lib.with_adapters(params, lora_lib.init_adapters(cfg, jax.random.key(seed), mesh, rules))
    return params


def init_params(checkpoint: str | os.PathLike, cfg: NVLMConfig, mesh: jax.sharding.Mesh, *,
                config_json: str | os.PathLike | None = None, allow_missing: bool = False,
                rules: LogicalRules = DEFAULT_RULES) -> tuple[dict[str, Any], list[str]]:
    """`(params, missing)` of a run's init checkpoint (see `init_source`) for model `cfg`."""
    loc, _ = init_source(checkpoint, config_json)
    if loc is None:
        return restore_params(checkpoint, param_target(cfg, mesh, rules), allow_missing=allow_missing)
    return load_params(loc, cfg, mesh, rules, allow_missing=allow_missing)
