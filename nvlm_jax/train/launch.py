"""From a run config (an `ml_collections.ConfigDict`, see `experiments/configs/`) to a training
run: model config, tokenizer, data pipelines, held-out evaluator, params init, then `loop.train`.

Run config fields (all configs define all of them):
  arch ("" = the init checkpoint's), stage, seed, num_steps, grad_accum_steps, log_every, max_nonfinite,
  peak_flops_per_device, compilation_cache_dir, tokenizer ("tiny" or a tokenizer folder;
  "" = the init checkpoint's folder),
  model: preset ("tiny", "72b", "34b"), dtype, param_dtype, remat_policy, attention_impl,
    llm / vision: field overrides (tiny runs),
  init: checkpoint (a converted folder, a training workdir / checkpoints/<step> folder, or a bare
    Orbax params folder; "" = from scratch; see `nvlm_jax.checkpoint.restore.init_source`),
    config_json (the model config when `checkpoint` is a bare params folder), allow_missing,
  data: kind ("synthetic", "pretrain_blend", "sft_blend", "files"), root (blends), tasks ({task:
    weight}, synthetic), train / eval / image_root / format / tfds_data_dir (files: your own
    datasets, `path[:weight]` entries, see `nvlm_jax.data.files`), prompt_format ("init": the
    init checkpoint's), train_size, eval_size, batch_size (global), seq_len, tiles_per_row,
    packing, num_workers (per data shard), read_threads, seed, num_shards (record-wise shards
    of the global batch, 0 = one per process; see `nvlm_jax.train.multihost`),
  eval: every (0 = only at the end), tasks (default: the data tasks), samples_per_task
    (0 = no evaluation), batch_size,
  optim: lr_max, lr_min, warmup_steps, total_steps (0 = num_steps), b1, b2, eps,
    weight_decay, clip_norm, mu_dtype,
  checkpoint: every, keep, keep_best, best_metric, best_mode, async_save,
  lora (optional; absent = off): rank (0 = off), alpha, dropout, targets ("llm", "llm_attention",
    "llm_mlp", "vision", "projector", comma-separated); see `nvlm_jax.config.LoraConfig`,
  mesh: data, fsdp, tensor, num_devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from nvlm_jax import config as model_config_lib
from nvlm_jax.checkpoint import frozen_base
from nvlm_jax.checkpoint import restore as restore_lib
from nvlm_jax.config import LoraConfig, NVLMConfig
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.train import checkpoint as ckpt_lib
from nvlm_jax.train import evaluate as eval_lib
from nvlm_jax.train import loop as loop_lib
from nvlm_jax.train import multihost
from nvlm_jax.train.optim import OptimConfig

log = logging.getLogger(__name__)

PRESETS = ("tiny", "72b", "34b")


def _plain(c: Any) -> Any:
    """ConfigDict / FrozenConfigDict / Mapping → plain dict (recursively)."""
    if hasattr(c, "to_dict"):
        return c.to_dict()
    if isinstance(c, Mapping):
        return {k: _plain(v) for k, v in c.items()}
    return c


# ---- model ---------------------------------------------------------------------------------------


def _preset(arch: str, preset: str, llm: Mapping[str, Any], vision: Mapping[str, Any]) -> NVLMConfig:
    if preset == "tiny":
        base = model_config_lib.tiny(arch)
        if llm or vision:
            v = dataclasses.replace(base.vision, **vision)
            m = dataclasses.replace(base.llm, **llm)
            proj = dataclasses.replace(
                base.projector, input_size=v.hidden_size * base.shuffle_scale**2,
                hidden_size=m.intermediate_size, output_size=m.hidden_size,
            )
            base = base.replace(vision=v, llm=m, projector=proj)
        return base
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {PRESETS}, got {preset!r}")
    if llm or vision:
        raise ValueError(f"model.llm / model.vision overrides are only for the tiny preset, not {preset!r}")
    return getattr(model_config_lib, f"nvlm_{arch.lower()}_{preset}")()


def model_config(c, tokenizer) -> NVLMConfig:
    """The model config of run config `c`: from the init checkpoint's config JSON when there is
    one, else from the preset; then the run's dtypes / remat / attention, and a vocabulary and
    image context token that fit `tokenizer`."""
    m = c.model
    if c.init.checkpoint:
        _, cfg = restore_lib.init_source(c.init.checkpoint, c.init.config_json or None)
        if c.arch and cfg.arch != c.arch:
            raise ValueError(f"init checkpoint {c.init.checkpoint} is NVLM-{cfg.arch} but the run's arch is {c.arch}; "
                             f"assemble an NVLM-{c.arch} checkpoint with nvlm_jax.convert first")
    elif not c.arch:
        raise ValueError("config.arch is empty (= the init checkpoint's) but there is no init.checkpoint")
    else:
        cfg = _preset(c.arch, m.preset, _plain(m.get("llm", {})), _plain(m.get("vision", {})))
    cfg = cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
                      attention_impl=m.attention_impl, lora=lora_config(c))
    from nvlm_jax.data.pipeline import config_for_tokenizer

    return config_for_tokenizer(cfg, tokenizer)


def lora_config(c) -> LoraConfig:
    """The run's LoRA adapters (`lora.*`; a config without a `lora` section trains none)."""
    if "lora" not in c:
        return LoraConfig()
    try:
        return LoraConfig(**_plain(c.lora))
    except TypeError as e:
        raise ValueError(f"config.lora: {e} (fields: rank, alpha, dropout, targets)") from e


def prompt_format(c, cfg: NVLMConfig) -> PromptFormat:
    """The `PromptFormat` of run config `c` for model `cfg`: `data.tag_style`, `data.max_tiles`
    (the stage's tile budget; 0 = the model's `max_tiles`) and `data.system_message` ("" = no
    system turn); thumbnail rule and tokens per tile from the model. With `data.prompt_format`
    "init" (fine-tuning), the init checkpoint's own saved format instead, so the model keeps
    being asked as it was trained. Saved with every checkpoint (the same rule reads checkpoints
    saved before the format was: `restore.run_prompt_format`)."""
    if c.data.get("prompt_format", "") == "init":
        if not c.init.checkpoint:
            raise ValueError("data.prompt_format 'init' needs an init.checkpoint")
        try:
            return restore_lib.read_info(c.init.checkpoint).prompt_format
        except ValueError as e:
            raise ValueError(f"data.prompt_format 'init': {e}; set data.prompt_format='' to use data.tag_style, "
                             "data.max_tiles and data.system_message") from e
    return restore_lib.run_prompt_format({"data": _plain(c.data)}, cfg)


def tokenizer_spec(c) -> str:
    """The run's tokenizer spec ("tiny" or a folder): `tokenizer`, else the init checkpoint's
    (a converted folder's own files, a training run's tokenizer, a bare params folder's files)."""
    if c.tokenizer:
        return c.tokenizer
    if not c.init.checkpoint:
        raise ValueError("config.tokenizer is empty and there is no init.checkpoint to take it from")
    try:
        spec = restore_lib.read_info(c.init.checkpoint).tokenizer
    except ValueError:
        return c.init.checkpoint  # a bare params folder: tokenizer files beside the params, if any
    if spec is None:
        raise ValueError(f"init.checkpoint {c.init.checkpoint} has no tokenizer; set config.tokenizer")
    return spec


def load_tokenizer(c):
    """The run's tokenizer: the built-in tiny one, a tokenizer folder, or the init checkpoint's."""
    from nvlm_jax.processing.tokenizer import tokenizer_from_spec

    return tokenizer_from_spec(tokenizer_spec(c))


# ---- data ----------------------------------------------------------------------------------------


def data_config(c, cfg: NVLMConfig, *, packing: bool | None = None, only: str | None = None,
                eval_size: int | None = None):
    """The `DataConfig` of run config `c` for model `cfg` (optionally one source only, for
    evaluation); its prompt format is `prompt_format(c, cfg)`, the one saved with the run."""
    from nvlm_jax.data import blends, sources
    from nvlm_jax.data.pipeline import DataConfig, synthetic_data_config

    d = c.data
    fmt = prompt_format(c, cfg)
    kwargs = dict(packing=d.packing if packing is None else packing, num_workers=d.num_workers,
                  read_threads=d.read_threads, prompt_format=fmt)
    if d.kind == "synthetic":
        data_cfg = synthetic_data_config(dict(d.tasks), train_size=d.train_size, eval_size=eval_size or d.eval_size,
                                         seed=d.seed, **kwargs)
    elif d.kind in ("pretrain_blend", "sft_blend"):
        if not d.root:
            raise ValueError(f"data.kind {d.kind!r} needs data.root (a folder of <dataset>/<split>.jsonl)")
        make = blends.pretrain_data_config if d.kind == "pretrain_blend" else blends.sft_data_config
        data_cfg = make(d.root, **kwargs)
    elif d.kind == "files":
        data_cfg = DataConfig(sources=_file_sources(d, "train" if only is None else "eval"), **kwargs)
    else:
        raise ValueError(f"data.kind must be 'synthetic', 'pretrain_blend', 'sft_blend' or 'files', got {d.kind!r}")
    if only is not None:
        spec = [s for s in data_cfg.sources if s.name == only]
        if not spec:
            raise ValueError(f"eval task {only!r} is not a data source; sources: {[s.name for s in data_cfg.sources]}")
        src = spec[0]
        if eval_size is not None and isinstance(src, sources.SyntheticSource):
            src = dataclasses.replace(src, eval_size=eval_size)
        data_cfg = DataConfig(sources=(dataclasses.replace(src, weight=1.0),), packing=False, shuffle=False,
                              num_epochs=1, num_workers=0, prompt_format=fmt)
    return data_cfg


def _file_sources(d, split: str) -> tuple:
    """The sources of `data.train` (split "train") or `data.eval` (split "eval") of a files run."""
    from nvlm_jax.data import files

    value = d.train if split == "train" else d.eval
    if not value:
        raise ValueError(f"data.kind 'files' needs data.{split} (a file, or 'path[:weight],path[:weight]')")
    return files.file_sources(_plain(value), split, image_root=d.get("image_root") or None,
                              record_format=d.get("format") or "auto", tfds_data_dir=d.get("tfds_data_dir") or None)


def eval_tasks(c) -> list[str]:
    """The held-out tasks: `eval.tasks`, else the eval files' sources (files runs; none without
    `data.eval`), else the data tasks."""
    if c.eval.tasks:
        return list(c.eval.tasks)
    if c.data.kind == "files":
        return [s.name for s in _file_sources(c.data, "eval")] if c.data.get("eval") else []
    return list(c.data.tasks)


def train_iterator(c, cfg: NVLMConfig, tokenizer):
    """The training iterator of this process: a `ShardedIterator` over the data shards it reads
    (`multihost.process_shards`), yielding its `batch_size * shards read / num_shards` rows of
    each global batch."""
    from nvlm_jax.data.pipeline import ShardedIterator, make_pipeline

    d = c.data
    num_shards = d.get("num_shards", 0) or jax.process_count()
    data_cfg = data_config(c, cfg)
    iterators = {}
    try:
        for index in multihost.process_shards(num_shards):
            iterators[index] = make_pipeline(
                data_cfg, cfg, tokenizer, split="train", seed=d.seed, batch_size=d.batch_size, seq_len=d.seq_len,
                tiles_per_row=d.tiles_per_row, shard_index=index, shard_count=num_shards,
            )
    except BaseException:
        for it in iterators.values():
            it.close()  # stops the worker processes of the shards already built
        raise
    return ShardedIterator(iterators, num_shards)


def eval_batches(c, cfg: NVLMConfig, tokenizer) -> dict[str, list[dict]]:
    """Held-out batches per eval task: the first `eval.samples_per_task` samples of each task's
    "eval" split, one sample per row, rows padded to the training shapes."""
    from nvlm_jax.data.pipeline import make_pipeline

    e, d = c.eval, c.data
    out = {}
    for task in eval_tasks(c):
        it = make_pipeline(
            data_config(c, cfg, only=task, eval_size=e.samples_per_task), cfg, tokenizer, split="eval", seed=d.seed,
            batch_size=e.batch_size, seq_len=d.seq_len, tiles_per_row=d.tiles_per_row,
        )
        batches, rows = [], 0
        for batch in it:
            batches.append(batch)
            rows += int((batch["loss_mask"].sum(axis=1) > 0).sum())
            if rows >= e.samples_per_task:
                break
        it.close()
        if not batches:
            raise ValueError(f"eval task {task!r} produced no held-out samples")
        out[task] = batches
    return out


def make_evaluator(c, cfg: NVLMConfig, tokenizer) -> eval_lib.ExactMatchEvaluator | None:
    """The held-out exact-match evaluator, or None when `eval.samples_per_task` is 0 or there
    are no eval tasks."""
    if not c.eval.samples_per_task or not eval_tasks(c):
        return None
    from nvlm_jax.processing import tokenizer as tok

    special = tok.get_special_tokens(tokenizer)
    return eval_lib.ExactMatchEvaluator(
        cfg, eval_batches(c, cfg, tokenizer), lambda ids: tok.decode(tokenizer, ids), [special.im_end],
    )


# ---- params init -----------------------------------------------------------------------------------


def params_initializer(c, cfg: NVLMConfig) -> loop_lib.InitParams | None:
    """`mesh -> params` restoring `init.checkpoint` (its own adapters folded in; missing leaves
    freshly initialised when `init.allow_missing`; fresh adapters of the run's own), or None for
    a from-scratch run (see `restore.run_init_params`)."""
    if not c.init.checkpoint:
        return None
    init = _plain(c.init)
    return lambda mesh: restore_lib.run_init_params(init, c.seed, cfg, mesh)


# ---- the run ---------------------------------------------------------------------------------------


def loop_config(c) -> loop_lib.LoopConfig:
    return loop_lib.LoopConfig(
        num_steps=c.num_steps, stage=c.stage, grad_accum_steps=c.grad_accum_steps, log_every=c.log_every,
        eval_every=c.eval.every, max_nonfinite=c.max_nonfinite, seed=c.seed,
        mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), num_devices=c.mesh.num_devices,
        peak_flops_per_device=c.peak_flops_per_device,
        allow_resume_changes=bool(c.get("allow_resume_changes", False)),
    )


def optim_config(c) -> OptimConfig:
    o = _plain(c.optim)
    if not o.get("total_steps"):
        o["total_steps"] = c.num_steps
    return OptimConfig(**o)


def checkpoint_config(c) -> ckpt_lib.CheckpointConfig:
    return ckpt_lib.CheckpointConfig(**_plain(c.checkpoint))


def enable_compilation_cache(path: str) -> None:
    """Persistent XLA compilation cache (restarts of the same run skip compiling)."""
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Run:
    """A prepared run: everything `loop.train` needs, built from a run config."""

    config: Any
    model: NVLMConfig
    tokenizer: Any
    evaluator: eval_lib.ExactMatchEvaluator | None


def prepare(c) -> Run:
    """Builds the tokenizer, model config and evaluator of run config `c`."""
    if c.compilation_cache_dir:
        enable_compilation_cache(c.compilation_cache_dir)
    tokenizer = load_tokenizer(c)
    cfg = model_config(c, tokenizer)
    return Run(c, cfg, tokenizer, make_evaluator(c, cfg, tokenizer))


def saved_run_config(c, cfg: NVLMConfig) -> dict[str, Any]:
    """What is saved with every checkpoint: the run config, its prompt format, and the init
    paths made absolute (a LoRA checkpoint re-creates its base from them, from any folder)."""
    out = dict(_plain(c), prompt_format=prompt_format(c, cfg).to_dict())
    out["init"] = dict(out.get("init") or {}, checkpoint=frozen_base.absolute(c.init.checkpoint),
                       config_json=frozen_base.absolute(c.init.get("config_json", "")))
    return out


def train(c, workdir: str | os.PathLike, *, console: bool = True, run: Run | None = None) -> loop_lib.TrainResult:
    """Trains as run config `c` says, in `workdir` (resuming from its checkpoints if any)."""
    run = run or prepare(c)
    it = train_iterator(c, run.model, run.tokenizer)
    try:
        return loop_lib.train(
            run.model, loop_config(c), optim_config(c), checkpoint_config(c), workdir, it,
            init_params=params_initializer(c, run.model), evaluate=run.evaluator,
            run_config=saved_run_config(c, run.model), console=console,
        )
    finally:
        it.close()


# ---- asking the trained model -----------------------------------------------------------------------


def question_batch(c, cfg: NVLMConfig, tokenizer, image, question: str) -> dict:
    """A one-row batch holding `question` about `image` (a PIL image or path; None for text-only)
    with the same transforms as training (tiling, chat template, tile tags, image tokens). The
    answer slot holds a placeholder: decoding starts where the answer would."""
    from nvlm_jax.data.pipeline import record_batch

    d = c.data
    record = {"conversations": [{"from": "human", "value": ("<image>\n" if image is not None else "") + question},
                                {"from": "gpt", "value": "?"}],
              "images": [image] if image is not None else []}
    return record_batch(record, cfg, tokenizer, seq_len=d.seq_len, tiles_per_row=d.tiles_per_row,
                        data_cfg=data_config(c, cfg), what="question")


def ask(run: Run, params, image, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy answer to `question` about `image` (see `question_batch`), from the
    KV-cache decoder (`nvlm_jax.batch_decode.greedy_batch`)."""
    from nvlm_jax.batch_decode import greedy_batch
    from nvlm_jax.generate import cut_at_stop
    from nvlm_jax.processing import tokenizer as tok

    batch = question_batch(run.config, run.model, run.tokenizer, image, question)
    special = tok.get_special_tokens(run.tokenizer)
    tokens = greedy_batch(params, run.model, batch, max_new_tokens, stop_token_ids=[special.im_end])
    answer, _ = cut_at_stop(tokens[0], [special.im_end])
    return tok.decode(run.tokenizer, answer.tolist()).strip()
