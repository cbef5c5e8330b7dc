"""Tests for nvlm_jax.data.mixture: weighted mixing, resume with new weights, skip accounting."""

import collections

import grain
import numpy as np
import pytest

from nvlm_jax.data import mixture
from nvlm_jax.data import transforms as tr


def _stream(name, n=None):
    """Records `(name, i)`; infinite (repeated) unless `n` is given."""
    ds = grain.MapDataset.range(n or 1000).map(lambda i, name=name: (name, int(i)))
    return (ds if n else ds.repeat()).to_iter_dataset(grain.ReadOptions(num_threads=0))


def _example(source, i=0):
    ids = np.arange(4, dtype=np.int32)
    return tr.Example(
        source,
        f"{source}#{i}",
        input_ids=ids,
        targets=ids,
        loss_mask=np.zeros(4, bool),
        token_image=np.full(4, -1, np.int32),
        token_tile=np.full(4, -1, np.int32),
        pixels=np.zeros((0, 2, 2, 3), np.uint8),
        tile_image=np.zeros((0,), np.int32),
    )


def _elements(source, pattern):
    """A finite stream of Examples ("e") and Skipped markers (a reason) in `pattern` order."""
    items = [
        _example(source, i) if p == "e" else tr.Skipped(source, f"{source}#{i}", p, "why")
        for i, p in enumerate(pattern)
    ]
    return grain.MapDataset.source(items).to_iter_dataset(grain.ReadOptions(num_threads=0))


def test_mixture_holds_weights_within_2_percent_over_10k_samples():
    weights = {"captions": 0.55, "vqa": 0.3, "ocr": 0.1, "text": 0.05}
    ds = mixture.mix({n: _stream(n) for n in weights}, weights)
    it = iter(ds)
    counts = collections.Counter(next(it)[0] for _ in range(10_000))
    for name, w in weights.items():
        assert abs(counts[name] / 10_000 - w) < 0.02, (name, counts)
    # Each source is read in order, without repeats.
    it = iter(mixture.mix({n: _stream(n) for n in weights}, weights))
    seen = collections.defaultdict(list)
    for _ in range(500):
        name, i = next(it)
        seen[name].append(i)
    assert all(v == list(range(len(v))) for v in seen.values())


def test_mixture_of_one_source_is_that_source():
    stream = _stream("a")
    assert mixture.mix({"a": stream}, {"a": 3.0}) is stream


@pytest.mark.parametrize(
    "weights, match",
    [({}, "at least one"), ({"a": 0.0}, "positive"), ({"a": -1.0}, "positive"), ({"a": "1"}, "positive")],
)
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ValueError, match=match):
        mixture.check_weights(weights)


def test_mixture_names_must_match():
    with pytest.raises(ValueError, match="names differ"):
        mixture.mix({"a": _stream("a")}, {"b": 1.0})


def test_resume_with_new_weights_continues_each_source_and_follows_the_new_weights():
    old = {"a": 0.5, "b": 0.5}
    it = iter(mixture.mix({n: _stream(n) for n in old}, old))
    before = [next(it) for _ in range(100)]
    state = it.get_state()
    new = {"a": 0.9, "b": 0.1}
    resumed = iter(mixture.mix({n: _stream(n) for n in new}, new))
    resumed.set_state(state)
    after = [next(resumed) for _ in range(1000)]
    counts = collections.Counter(name for name, _ in after)
    assert abs(counts["a"] / 1000 - 0.9) < 0.02
    for name in old:
        first_after = next(i for n, i in after if n == name)
        assert first_after == max(i for n, i in before if n == name) + 1  # no repeat, no gap


def test_resume_with_an_added_source_starts_it_from_its_beginning():
    it = iter(mixture.mix({"a": _stream("a"), "b": _stream("b")}, {"a": 1.0, "b": 1.0}))
    for _ in range(10):
        next(it)
    state = it.get_state()
    grown = iter(mixture.mix({n: _stream(n) for n in "abc"}, {"a": 1.0, "b": 1.0, "c": 1.0}))
    grown.set_state(state)
    firsts = {}
    for _ in range(30):
        name, i = next(grown)
        firsts.setdefault(name, i)
    assert firsts["c"] == 0 and firsts["a"] == 5 and firsts["b"] == 5


def test_account_skips_counts_per_source_and_reason_and_attaches_deltas():
    a = _elements("a", ["e", tr.MISSING_IMAGE, tr.MISSING_IMAGE, "e", tr.TOO_LONG, "e"])
    ds = mixture.AccountSkips(a, max_skip_rate=1.0, min_samples=100)
    examples = list(ds)
    assert len(examples) == 3
    assert [ex.stats for ex in examples] == [
        {"a": {"seen": 1}},
        {"a": {"seen": 3, tr.MISSING_IMAGE: 2}},
        {"a": {"seen": 2, tr.TOO_LONG: 1}},
    ]
    total = {}
    for ex in examples:
        mixture.merge_counts(total, ex.stats)
    assert total == {"a": {"seen": 6, tr.MISSING_IMAGE: 2, tr.TOO_LONG: 1}}
    assert "a: 3/6 skipped (50.0%): missing_image=2, too_long=1" in mixture.describe_counts(total)


def test_skip_rate_over_threshold_stops_with_the_source_and_reasons_named():
    pattern = ["e", tr.CORRUPT_IMAGE] * 10
    ds = mixture.AccountSkips(_elements("laion", pattern), max_skip_rate=0.3, min_samples=6)
    it = iter(ds)
    next(it)
    next(it)  # 4 records seen: below min_samples, no check yet
    with pytest.raises(mixture.SkipRateExceeded) as e:
        list(it)
    message = str(e.value)
    assert "'laion'" in message and "3 of 6" in message and "corrupt_image=3" in message
    assert "laion#1: corrupt_image: why" in message  # an example record


def test_a_source_that_only_skips_stops_even_with_the_check_disabled():
    ds = mixture.AccountSkips(_elements("bad", [tr.MISSING_IMAGE] * 50), max_skip_rate=1.0, min_samples=20)
    with pytest.raises(mixture.SkipRateExceeded, match="20 of 20"):
        next(iter(ds))


def test_account_skips_state_restores_counts():
    pattern = ["e", tr.MISSING_IMAGE] * 20
    ds = mixture.AccountSkips(_elements("a", pattern), max_skip_rate=0.6, min_samples=10)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [ex.stats for ex in it]
    it2 = iter(ds)
    it2.set_state(state)
    assert [ex.stats for ex in it2] == rest
    assert state["counts"] == {"a": {"seen": 9, tr.MISSING_IMAGE: 4}}
