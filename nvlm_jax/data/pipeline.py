"""The data pipeline's entry point: data config -> checkpointable iterator of static-shape batches.

Per source (each a `grain.MapDataset`, lazily evaluated):
  open split -> parse -> this host's shard (`[shard_index::shard_count]`) -> shuffle (seeded
  per source and epoch) -> repeat -> ValidateConversation -> LoadImages -> TileImages ->
  EncodeConversation -> MakeTargets -> to_iter_dataset
Then: weighted mix (`mixture.mix`) -> `mixture.AccountSkips` -> pack (NVLM-D with
`packing=True`) or one sample per row (X/H) -> batches of `batch_size // shard_count` rows
(`packing.BatchRows`) -> optional `mp_prefetch` workers -> `DataIterator` (pops the
per-batch record counts, logs skips every `log_every_batches`, checkpoints).

Shuffling happens per source, before mixing: a full (not windowed) index shuffle, reseeded
every epoch, so each draw from a source is uniform over it; the mixer then interleaves the
sources in a fixed weighted pattern. Nothing is buffered for it (a window shuffle after the mix
would hold decoded samples in memory).

Determinism: for a fixed config, seed, shard and worker count the batch sequence is fixed;
`DataIterator.get_state()` / `set_state()` resume it exactly. The worker count is part of that
(each worker reads its own slice and packs it), so keep `num_workers` when resuming. Changing
source weights on resume is allowed: see `mixture.py` for what happens.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from nvlm_jax.config import NVLMConfig
from nvlm_jax.data import batch as batch_lib
from nvlm_jax.data import mixture, packing, parsing, sources
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import tiling
from nvlm_jax.processing import tokenizer as tokenizer_lib
from nvlm_jax.processing.prompt_format import PromptFormat


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
      sources: source specs (`sources.JsonlSource`, `TfdsSource`, `ArrayRecordSource`,
        `SyntheticSource`), each with a unique `name` and a mixture `weight`.
      packing: pack several samples per row (NVLM-D only; X and H always get one per row).
      num_packing_bins: rows the first-fit packer keeps open.
      num_workers: `mp_prefetch` worker processes; 0 runs everything in the calling process.
      worker_buffer_size: batches buffered per worker.
      read_threads: threads per source reading and transforming ahead (0: none; each source's
        buffer holds decoded samples, so keep this small with many sources).
      shuffle: shuffle each source (per epoch; seeded from the pipeline seed and the source name).
      num_epochs: passes over each source; None repeats forever (training). The mixture ends when
        any source ends; the last batch is completed with empty rows.
      prompt_format: how prompts are written: tile budget (`max_tiles`, the stage's: 1 resizes
        every image to one tile), thumbnail rule, tile tags, tokens per tile, system message.
        None: `PromptFormat.for_model(model_cfg)` (the model's budget, release tags and system
        message). Its `tokens_per_tile` must be the model's `num_image_tokens`.
      max_pixels: refuse larger images (decompression bombs) as corrupt.
      max_skip_rate: fraction of a source's records that may be skipped before the run stops.
      min_samples_for_skip_check: records of a source to see before its skip rate is checked.
      log_every_batches: log the skip counts every this many batches (0: never).
    """

    sources: tuple[sources.SourceSpec, ...]
    packing: bool = True
    num_packing_bins: int = 4
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    prompt_format: PromptFormat | None = None
    max_pixels: int | None = tiling.DEFAULT_MAX_PIXELS
    max_skip_rate: float = 0.1
    min_samples_for_skip_check: int = 100
    log_every_batches: int = 100

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("DataConfig needs at least one source")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"DataConfig source names must be unique; repeated: {duplicates}")
        mixture.check_weights(self.weights)
        if self.num_workers < 0 or self.read_threads < 0 or self.num_packing_bins < 1:
            raise ValueError("num_workers and read_threads must be >= 0 and num_packing_bins >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        if self.prompt_format is not None and not isinstance(self.prompt_format, PromptFormat):
            raise ValueError(f"prompt_format must be a PromptFormat or None, got {type(self.prompt_format).__name__}")

    @property
    def weights(self) -> dict[str, float]:
        """`{source name: weight}` as configured (not normalised)."""
        return {s.name: s.weight for s in self.sources}

    def with_weights(self, weights: Mapping[str, float]) -> DataConfig:
        """A copy with some sources' weights replaced (names must exist)."""
        unknown = sorted(set(weights) - set(self.weights))
        if unknown:
            raise ValueError(f"unknown sources {unknown}; the config has {sorted(self.weights)}")
        new = tuple(dataclasses.replace(s, weight=weights.get(s.name, s.weight)) for s in self.sources)
        return dataclasses.replace(self, sources=new)


def config_for_tokenizer(cfg: NVLMConfig, tokenizer: Any, *, vocab_multiple: int = 128) -> NVLMConfig:
    """`cfg` with the tokenizer's `<|vision_pad|>` as image context token and a vocabulary that fits it.

    `llm.vocab_size` becomes the larger of its current value and the tokenizer's size (added
    tokens included) rounded up to `vocab_multiple` (so the embedding shards evenly). For the
    released NVLM-D-72B config and tokenizer nothing changes; for `tiny()` (512-entry
    placeholder vocabulary) with the tiny tokenizer it becomes 1024 with id 931.
    """
    encoder = tokenizer_lib.text_encoder(tokenizer)
    needed = -(-encoder.vocab_size // vocab_multiple) * vocab_multiple
    llm = dataclasses.replace(cfg.llm, vocab_size=max(cfg.llm.vocab_size, needed))
    return cfg.replace(llm=llm, image_context_token_id=encoder.special.vision_pad)


def _source_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 32)


def _check_model_and_tokenizer(model_cfg: NVLMConfig, tokenizer: Any) -> tokenizer_lib.TextEncoder:
    encoder = tokenizer_lib.text_encoder(tokenizer)
    if model_cfg.image_context_token_id != encoder.special.vision_pad:
        raise ValueError(
            f"model config image_context_token_id={model_cfg.image_context_token_id} but the tokenizer's "
            f"<|vision_pad|> is {encoder.special.vision_pad}; build the config with "
            "data.pipeline.config_for_tokenizer(cfg, tokenizer)"
        )
    if model_cfg.llm.vocab_size < encoder.vocab_size:
        raise ValueError(
            f"model vocab_size {model_cfg.llm.vocab_size} < tokenizer size {encoder.vocab_size}; "
            "use data.pipeline.config_for_tokenizer(cfg, tokenizer)"
        )
    return encoder


def _source_dataset(
    spec: sources.SourceSpec,
    data_cfg: DataConfig,
    model_cfg: NVLMConfig,
    tokenizer: Any,
    encoder: tokenizer_lib.TextEncoder,
    *,
    split: str,
    seed: int,
    seq_len: int,
    tiles_per_row: int,
    shard_index: int,
    shard_count: int,
) -> grain.IterDataset:
    """One source's lazily transformed stream of `Example | Skipped`."""
    records = spec.open(split, tile_size=model_cfg.vision.image_size)
    if len(records) < shard_count:
        raise ValueError(f"data source {spec.name!r} split {split!r} has {len(records)} records < {shard_count} shards")
    ds = grain.MapDataset.source(records).map(tr.Guarded(spec.parser(split)))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=_source_seed(seed, spec.name))
    if data_cfg.num_epochs != 1:
        ds = ds.repeat(data_cfg.num_epochs)
    for transform in record_transforms(model_cfg, tokenizer, seq_len=seq_len, tiles_per_row=tiles_per_row,
                                       pad_id=encoder.special.endoftext, **_record_settings(data_cfg)):
        ds = ds.map(transform)
    buffer = 2 * data_cfg.read_threads
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=buffer))


def make_dataset(
    data_cfg: DataConfig,
    model_cfg: NVLMConfig,
    tokenizer: Any,
    *,
    split: str,
    seed: int,
    batch_size: int,
    seq_len: int,
    tiles_per_row: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """The grain dataset behind `make_pipeline` (same arguments); its batches also hold `packing.STATS_KEY`."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < shard_count or batch_size % shard_count:
        raise ValueError(f"global batch_size {batch_size} must be a positive multiple of shard_count {shard_count}")
    if seq_len < 2 or tiles_per_row < 1:
        raise ValueError(f"need seq_len >= 2 and tiles_per_row >= 1, got {seq_len}, {tiles_per_row}")
    encoder = _check_model_and_tokenizer(model_cfg, tokenizer)
    streams = {
        spec.name: _source_dataset(
            spec,
            data_cfg,
            model_cfg,
            tokenizer,
            encoder,
            split=split,
            seed=seed,
            seq_len=seq_len,
            tiles_per_row=tiles_per_row,
            shard_index=shard_index,
            shard_count=shard_count,
        )
        for spec in data_cfg.sources
    }
    ds = mixture.mix(streams, data_cfg.weights)
    ds = mixture.AccountSkips(ds, max_skip_rate=data_cfg.max_skip_rate, min_samples=data_cfg.min_samples_for_skip_check)
    pad_id = encoder.special.endoftext
    if data_cfg.packing and model_cfg.arch == "D":
        ds = packing.PackExamples(
            ds, seq_len=seq_len, tiles_per_row=tiles_per_row, num_bins=data_cfg.num_packing_bins, pad_id=pad_id
        )
    else:
        ds = ds.map(packing.ExampleToRow(seq_len, pad_id))
    rows = batch_size // shard_count
    batch_fn = packing.BatchRows(
        batch_size=rows,
        seq_len=seq_len,
        tiles_per_row=tiles_per_row,
        tile_size=model_cfg.vision.image_size,
        pad_id=pad_id,
    )
    ds = ds.batch(rows, drop_remainder=False, batch_fn=batch_fn)
    if data_cfg.num_workers:
        if not flags.FLAGS.is_parsed():
            # grain's workers read absl flags; outside an absl app nothing has parsed them.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size
            ),
            worker_init_fn=functools.partial(exit_with_parent, os.getpid()),
        )
    return ds


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 0, poll_s: float = 0.5) -> None:
    """Grain worker start-up: a daemon thread ends this worker as soon as the process that
    built the pipeline is gone (a killed trainer would otherwise leave its workers, and through
    them multiprocessing's resource tracker, running for minutes)."""
    del worker_index, worker_count
    spawner = os.getppid()  # the pipeline's process, or a fork server between us

    def watch() -> None:
        while True:
            if os.getppid() != spawner or not _alive(parent_pid):
                os._exit(0)  # nothing to clean up: the reader of our results is gone
            time.sleep(poll_s)

    threading.Thread(target=watch, name="nvlm-exit-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a killed process its own parent has not reaped yet is a zombie: dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no procfs: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DataIterator:
    """Iterator of batch dicts (`batch.py` contract), with per-source skip counts and a checkpointable state.

    The state (`get_state()`) is a JSON-serialisable dict: grain's iterator state plus the
    cumulative record counts; `set_state()` on a fresh iterator of the same pipeline resumes
    with exactly the batches an uninterrupted run would produce next.
    """

    def __init__(self, dataset: grain.IterDataset, log_every_batches: int = 0):
        self._iterator = dataset.__iter__()
        self._log_every = log_every_batches
        self._counts: mixture.Counts = {}
        self._batches = 0
        self._validated = False

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        mixture.merge_counts(self._counts, batch.pop(packing.STATS_KEY))
        if not self._validated:
            batch_lib.validate_batch(batch)  # once: the shapes are static after that
            self._validated = True
        self._batches += 1
        if self._log_every and self._batches % self._log_every == 0:
            logging.info("data after %d batches, records per source:\n%s", self._batches, self.describe())
        return batch

    @property
    def batches(self) -> int:
        """Batches returned so far (including before a restore)."""
        return self._batches

    @property
    def counts(self) -> mixture.Counts:
        """`{source: {"seen": n, reason: n, ...}}` over all batches returned so far."""
        return copy.deepcopy(self._counts)

    @property
    def skip_counts(self) -> dict[str, dict[str, int]]:
        """`{source: {reason: n}}` of skipped records (sources without skips omitted)."""
        out = {}
        for source, reasons in self._counts.items():
            skipped = {r: n for r, n in reasons.items() if r != mixture.SEEN}
            if skipped:
                out[source] = skipped
        return out

    def describe(self) -> str:
        """Human-readable per-source counts (`mixture.describe_counts`)."""
        return mixture.describe_counts(self._counts)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), "counts": copy.deepcopy(self._counts), "batches": self._batches}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        self._counts = copy.deepcopy(dict(state["counts"]))
        self._batches = int(state["batches"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        self._iterator.close()

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prompt_format_for(model_cfg: NVLMConfig, fmt: PromptFormat | None = None) -> PromptFormat:
    """`fmt` (None: `PromptFormat.for_model(model_cfg)`), checked against the model: its tokens
    per tile must be the model's `num_image_tokens`."""
    fmt = fmt or PromptFormat.for_model(model_cfg)
    if fmt.tokens_per_tile != model_cfg.num_image_tokens:
        raise ValueError(
            f"prompt_format.tokens_per_tile={fmt.tokens_per_tile} but the model makes "
            f"{model_cfg.num_image_tokens} image tokens per tile"
        )
    return fmt


def _record_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The `DataConfig` fields the per-record transforms read."""
    return dict(fmt=data_cfg.prompt_format, max_pixels=data_cfg.max_pixels)


def record_transforms(model_cfg: NVLMConfig, tokenizer: Any, *, seq_len: int, tiles_per_row: int, pad_id: int,
                      fmt: PromptFormat | None = None,
                      max_pixels: int | None = tiling.DEFAULT_MAX_PIXELS) -> list[grain.transforms.Map]:
    """The per-record steps of every pipeline, after parsing: validate, load and tile images
    (the prompt format's tile budget and thumbnail rule), encode the conversation (its tags,
    tokens per tile and system message), make the targets. `fmt`: see `prompt_format_for`;
    other keywords as in `DataConfig`. One-off callers (`record_batch`) use the same list, so a
    question asked of a trained model is encoded exactly as its training data was."""
    fmt = prompt_format_for(model_cfg, fmt)
    steps = [
        tr.ValidateConversation(),
        tr.LoadImages(max_pixels),
        tr.TileImages(model_cfg.vision.image_size, fmt.max_tiles, fmt.use_thumbnail, tiles_per_row),
        tr.EncodeConversation(tokenizer, arch=model_cfg.arch, fmt=fmt),
        tr.MakeTargets(seq_len=seq_len, pad_id=pad_id),
    ]
    return [tr.Guarded(step) for step in steps]


def record_batch(record: Mapping[str, Any], model_cfg: NVLMConfig, tokenizer: Any, *, seq_len: int,
                 tiles_per_row: int, data_cfg: DataConfig | None = None, what: str = "record") -> dict[str, np.ndarray]:
    """One record (`{"conversations": [...], "images": [...]}`) as a one-row batch with the
    pipeline's transforms (settings, the prompt format included, from `data_cfg`; None: the
    model's defaults) and batch layout; a record the pipeline would skip is a ValueError naming
    `what` and the reason."""
    pad_id = tokenizer_lib.get_special_tokens(tokenizer).endoftext
    settings = _record_settings(data_cfg) if data_cfg is not None else {}
    element = tr.Guarded(parsing.ParseRecordDict(what)).map((what, record))
    for transform in record_transforms(model_cfg, tokenizer, seq_len=seq_len, tiles_per_row=tiles_per_row,
                                       pad_id=pad_id, **settings):
        element = transform.map(element)
    if isinstance(element, tr.Skipped):
        raise ValueError(f"cannot encode the {what}: {element}")
    row = packing.build_row([element], seq_len=seq_len, pad_id=pad_id)
    batch = packing.BatchRows(batch_size=1, seq_len=seq_len, tiles_per_row=tiles_per_row,
                              tile_size=model_cfg.vision.image_size, pad_id=pad_id)([row])
    batch.pop(packing.STATS_KEY, None)
    return batch


class ShardedIterator:
    """Several data shards of one process as one iterator: each batch is the shards' batches
    concatenated row-wise in shard order (`[sum of rows, ...]`), the state is `{shard index:
    DataIterator state}`. A run that fixes its shard count reads the same global batches on
    any number of processes dividing it (see `nvlm_jax.train.multihost`).

    Attributes: num_shards (shards of the whole run), shard_indices (this iterator's, ascending).
    """

    def __init__(self, iterators: Mapping[int, DataIterator], num_shards: int):
        if not iterators:
            raise ValueError("ShardedIterator needs at least one shard iterator")
        bad = [i for i in iterators if not 0 <= i < num_shards]
        if bad:
            raise ValueError(f"shard indices {bad} are not in [0, {num_shards})")
        self.num_shards = num_shards
        self.shard_indices = tuple(sorted(iterators))
        self._iterators = {i: iterators[i] for i in self.shard_indices}

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batches = [next(it) for it in self._iterators.values()]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[int, Any]:
        return {i: it.get_state() for i, it in self._iterators.items()}

    def set_state(self, state: Mapping[int, Any]) -> None:
        missing = sorted(set(self.shard_indices) - set(state))
        if missing:
            raise ValueError(f"no iterator state for data shard(s) {missing}")
        for i, it in self._iterators.items():
            it.set_state(state[i])

    def describe(self) -> str:
        return "\n".join(f"shard {i}:\n{it.describe()}" for i, it in self._iterators.items())

    def close(self) -> None:
        for it in self._iterators.values():
            it.close()

    def __enter__(self) -> ShardedIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_pipeline(
    data_cfg: DataConfig,
    model_cfg: NVLMConfig,
    tokenizer: Any,
    *,
    split: str,
    seed: int,
    batch_size: int,
    seq_len: int,
    tiles_per_row: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> DataIterator:
    """Builds the data pipeline and returns its iterator.

    Args:
      data_cfg: sources with weights, packing, workers, skip thresholds (`DataConfig`).
      model_cfg: the model config: arch (D packs; X/H one sample per row), tile size
        (`vision.image_size`), tokens per tile (`num_image_tokens`), `image_context_token_id`
        (must be the tokenizer's `<|vision_pad|>`; see `config_for_tokenizer`); the tile budget
        and thumbnail rule come from `data_cfg.prompt_format` (default: the model's).
      tokenizer: from `processing.load_tokenizer` (or a `tokenizers.Tokenizer`).
      split: split name every source must have ("train", "eval", ...).
      seed: shuffling seed.
      batch_size: GLOBAL batch size; this shard yields `batch_size // shard_count` rows.
      seq_len: tokens per row (S); longer samples are skipped (too_long).
      tiles_per_row: tile slots per row (T); samples needing more are skipped (too_many_tiles).
      shard_index, shard_count: this host's shard; each source is split record-wise
        (`[shard_index::shard_count]`), so hosts read disjoint records.

    Returns:
      A `DataIterator` of dicts satisfying `batch.validate_batch` with shapes `[B, S]` and
      `pixel_values [B, T, tile, tile, 3]`, B = `batch_size // shard_count`.
    """
    ds = make_dataset(
        data_cfg,
        model_cfg,
        tokenizer,
        split=split,
        seed=seed,
        batch_size=batch_size,
        seq_len=seq_len,
        tiles_per_row=tiles_per_row,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return DataIterator(ds, data_cfg.log_every_batches)


def synthetic_data_config(
    weights: Mapping[str, float] | Sequence[str] = ("colour", "shape"),
    *,
    train_size: int = 100_000,
    eval_size: int = 1_000,
    seed: int = 0,
    **kwargs: Any,
) -> DataConfig:
    """A `DataConfig` of built-in synthetic tasks: `{task: weight}` (or task names, equal weights).

    Extra keyword arguments go to `DataConfig` (packing, num_workers, ...).
    """
    if not isinstance(weights, Mapping):
        weights = {task: 1.0 for task in weights}
    specs = tuple(
        sources.SyntheticSource(task, train_size=train_size, eval_size=eval_size, seed=seed, weight=w)
        for task, w in weights.items()
    )
    return DataConfig(sources=specs, **kwargs)
