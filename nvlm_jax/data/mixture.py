"""Weighted mixing of per-source streams, and per-source accounting of skipped records.

Mixing uses `grain.IterDataset.mix` over a *mapping* `{source name: stream}`: a deterministic
interleave that holds the weights exactly (over any window of `sum(int weights)` draws), and
whose checkpoint stores each source's own position under its name.

Changing the weights on resume (restoring a state saved under other weights) is allowed:
every source continues from its own saved position, so within a source no record is repeated
or skipped; the mixer's draw counter continues too, and from the first resumed draw the
interleave follows the new weights. A source added since the checkpoint starts from its
beginning; a removed one is dropped. (With NVLM-D packing, the packing window open at the
checkpoint is re-filled under the new weights, so up to one window of samples —
`num_packing_bins` rows — differs from what the old weights would have given.)

`AccountSkips` sits right after the mixer: it drops `transforms.Skipped` markers, counts every
record per source as seen/skipped-by-reason, and attaches the counts accumulated since the
previous kept example to the next kept `Example` (`Example.stats`), so the counts travel with
the data through packing, batching and worker processes to the main process. It stops the run
with `SkipRateExceeded` when a source's skip rate passes `max_skip_rate` after at least
`min_samples` of its records (or when a source has produced nothing but skips by then).
Its counters are part of the iterator state. With `mp_prefetch` each worker counts the slice
it reads, so the threshold applies per worker.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import grain

from nvlm_jax.data import transforms as tr

SEEN = "seen"

# {source: {"seen": n, reason: n, ...}}
Counts = dict[str, dict[str, int]]


class SkipRateExceeded(RuntimeError):
    """A source skipped too many records; the message names it and the reasons."""


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validates `{name: weight}` (non-empty, all > 0) and returns it normalised to sum 1."""
    if not weights:
        raise ValueError("a mixture needs at least one source")
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w > 0)}
    if bad:
        raise ValueError(f"mixture weights must be positive numbers; bad: {bad}")
    total = float(sum(weights.values()))
    return {k: float(w) / total for k, w in weights.items()}


def mix(datasets: Mapping[str, grain.IterDataset], weights: Mapping[str, float]) -> grain.IterDataset:
    """Interleaves `{name: stream}` with `{name: weight}` (same names); one stream is returned as is.

    The mix stops when any stream ends (streams are repeated for training, so it does not).
    """
    if set(datasets) != set(weights):
        raise ValueError(f"mixture names differ: datasets {sorted(datasets)} vs weights {sorted(weights)}")
    normalised = check_weights(weights)
    if len(datasets) == 1:
        return next(iter(datasets.values()))
    names = list(datasets)
    return grain.IterDataset.mix({n: datasets[n] for n in names}, {n: normalised[n] for n in names})


def merge_counts(into: Counts, other: Mapping[str, Mapping[str, int]] | None) -> Counts:
    """Adds `other` into `into` (in place) and returns `into`."""
    for source, reasons in (other or {}).items():
        bucket = into.setdefault(source, {})
        for reason, n in reasons.items():
            bucket[reason] = bucket.get(reason, 0) + int(n)
    return into


def skipped_total(reasons: Mapping[str, int]) -> int:
    """Records skipped for any reason in one source's counts."""
    return sum(n for reason, n in reasons.items() if reason != SEEN)


def describe_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """One line per source: `name: 3/1000 skipped (0.3%): missing_image=2, corrupt_image=1`."""
    lines = []
    for source in sorted(counts):
        reasons = counts[source]
        seen, skipped = reasons.get(SEEN, 0), skipped_total(reasons)
        detail = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()) if r != SEEN)
        rate = 100.0 * skipped / max(seen, 1)
        lines.append(f"{source}: {skipped}/{seen} skipped ({rate:.1f}%)" + (f": {detail}" if detail else ""))
    return "\n".join(lines)


class _AccountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_skip_rate: float, min_samples: int):
        super().__init__(parent)
        self._max_skip_rate = max_skip_rate
        self._min_samples = min_samples
        self._counts: Counts = {}
        self._examples: dict[str, str] = {}  # "source/reason" -> first skip message

    def _check(self, source: str) -> None:
        reasons = self._counts[source]
        seen, skipped = reasons[SEEN], skipped_total(reasons)
        if seen < self._min_samples:
            return
        if skipped / seen > self._max_skip_rate or skipped == seen:
            lines = [
                f"  {r}={n}, e.g. {self._examples.get(f'{source}/{r}', '')}"
                for r, n in sorted(reasons.items())
                if r != SEEN
            ]
            raise SkipRateExceeded(
                f"data source {source!r}: {skipped} of {seen} records skipped "
                f"({100.0 * skipped / seen:.1f}% > max_skip_rate {100.0 * self._max_skip_rate:.1f}%). "
                "Reasons:\n" + "\n".join(lines) + "\nFix the data or raise DataConfig.max_skip_rate."
            )

    def __next__(self) -> tr.Example:
        delta: Counts = {}
        while True:
            element = next(self._parent)
            source = element.source
            for counts in (self._counts, delta):
                bucket = counts.setdefault(source, {})
                bucket[SEEN] = bucket.get(SEEN, 0) + 1
                if isinstance(element, tr.Skipped):
                    bucket[element.reason] = bucket.get(element.reason, 0) + 1
            if isinstance(element, tr.Skipped):
                self._examples.setdefault(f"{source}/{element.reason}", str(element))
                self._check(source)
                continue
            if not isinstance(element, tr.Example):
                raise TypeError(f"{source}: expected a transforms.Example, got {type(element).__name__}")
            return dataclasses.replace(element, stats=delta)

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "counts": copy.deepcopy(self._counts),
            "examples": dict(self._examples),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = copy.deepcopy(state["counts"])
        self._examples = dict(state["examples"])

    def __str__(self) -> str:
        return f"AccountSkips(max_skip_rate={self._max_skip_rate}, min_samples={self._min_samples})"


class AccountSkips(grain.IterDataset):
    """Drops `Skipped` markers, counting them per source; attaches the counts to the next `Example`.

    Args:
      parent: a stream of `transforms.Example | transforms.Skipped`.
      max_skip_rate: fraction of a source's records that may be skipped (0..1).
      min_samples: records of a source to see before its rate is checked.
    """

    def __init__(self, parent: grain.IterDataset, *, max_skip_rate: float, min_samples: int):
        super().__init__(parent)
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self._max_skip_rate = max_skip_rate
        self._min_samples = min_samples

    def __iter__(self) -> _AccountSkipsIterator:
        return _AccountSkipsIterator(self._parent.__iter__(), self._max_skip_rate, self._min_samples)

    def __str__(self) -> str:
        return f"AccountSkips(max_skip_rate={self._max_skip_rate}, min_samples={self._min_samples})"
