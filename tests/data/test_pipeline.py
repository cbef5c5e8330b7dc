"""Tests for nvlm_jax.data.pipeline: the entry point end to end on synthetic and JSONL data."""

import collections
import dataclasses
import io
import logging

import numpy as np
import pytest
from PIL import Image

from nvlm_jax import config as config_lib
from nvlm_jax.data import mixture, sources, synthetic
from nvlm_jax.data import pipeline as pl
from nvlm_jax.data import transforms as tr
from nvlm_jax.data.batch import check_batch_semantics, validate_batch
from nvlm_jax.processing import get_special_tokens, load_tokenizer, make_tiny_tokenizer
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.processing.tokenizer import decode

SEQ, TILES = 192, 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def cfgs(tok):
    return {arch: pl.config_for_tokenizer(config_lib.tiny(arch), tok) for arch in "DXH"}


def _pipe(data, cfg, tok, *, batch_size=4, seq_len=SEQ, tiles=TILES, split="train", seed=0, **kw):
    return pl.make_pipeline(
        data, cfg, tok, split=split, seed=seed, batch_size=batch_size, seq_len=seq_len, tiles_per_row=tiles, **kw
    )


def _mixed(**kw):
    return pl.synthetic_data_config({"colour": 2, "shape": 2, "ocr": 1, "chart": 1, "arithmetic": 1}, **kw)


def _assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _png(size=(28, 28)):
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 0)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# Model config and tokenizer.


def test_config_for_tokenizer_uses_the_vision_pad_id_and_a_vocab_that_fits(tok):
    special = get_special_tokens(tok)
    cfg = pl.config_for_tokenizer(config_lib.tiny("D"), tok)
    assert cfg.image_context_token_id == special.vision_pad == 931
    assert cfg.llm.vocab_size == 1024 and cfg.llm.vocab_size >= len(tok)
    assert pl.config_for_tokenizer(cfg, tok) == cfg
    tiny = config_lib.tiny("D")
    big = tiny.replace(llm=dataclasses.replace(tiny.llm, vocab_size=4096))
    assert pl.config_for_tokenizer(big, tok).llm.vocab_size == 4096  # never shrinks


def test_a_model_config_not_built_for_the_tokenizer_is_refused(tok):
    with pytest.raises(ValueError, match="config_for_tokenizer"):
        _pipe(_mixed(), config_lib.tiny("D"), tok)


# ------------------------------------------------------------------------------------------
# Batches.


def test_nvlm_d_batches_meet_the_contract_and_pack_several_samples(tok, cfgs):
    cfg = cfgs["D"]
    it = _pipe(_mixed(), cfg, tok)
    for _ in range(3):
        batch = next(it)
        assert check_batch_semantics(batch) == (4, SEQ, TILES)
        assert batch["pixel_values"].shape[2:] == (28, 28, 3)
        assert batch["segment_ids"].max(1).min() >= 2  # several samples per row
        for r in range(4):
            valid = batch["tile_valid"][r]
            n = int(valid.sum())
            assert valid[:n].all() and not valid[n:].any()
            # NVLM-D: every valid tile has its image tokens in the row, in order.
            assert (batch["input_ids"][r] == cfg.image_context_token_id).sum() == n * cfg.num_image_tokens
            tags = batch["token_tile"][r][batch["token_tile"][r] >= 0]
            assert set(tags.tolist()) == set(range(n))
            assert (np.diff(tags) >= 0).all()
            images = batch["tile_image"][r][:n]
            assert (np.diff(images) >= 0).all() and (batch["tile_image"][r][n:] == -1).all()
            tok_images = batch["token_image"][r]
            assert set(tok_images[tok_images >= 0].tolist()) == set(images.tolist())
            seg = batch["segment_ids"][r]
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
            assert (batch["positions"][r][starts[seg[starts] > 0]] == 0).all()
            # token_image never crosses into another packed sample: it is -1 at each segment start.
            assert (tok_images[starts[seg[starts] > 0]] == -1).all()
            # Loss only on answer tokens, never on the last token of a segment.
            last = np.flatnonzero(np.diff(np.concatenate([seg, [0]])) != 0)
            assert not batch["loss_mask"][r][last].any()
            assert batch["loss_mask"][r].any()
            answers = decode(tok, batch["targets"][r][batch["loss_mask"][r]])
            assert answers.count("<|im_end|>") == seg.max()
    assert it.counts.keys() == {"colour", "shape", "ocr", "chart", "arithmetic"}


@pytest.mark.parametrize("arch", ["X", "H"])
def test_cross_attention_archs_get_one_sample_per_row(tok, cfgs, arch):
    cfg = cfgs[arch]
    batch = next(_pipe(_mixed(), cfg, tok, batch_size=6))
    assert check_batch_semantics(batch) == (6, SEQ, TILES)
    assert batch["segment_ids"].max() == 1
    n_tiles = batch["tile_valid"].sum(1)
    pads = (batch["input_ids"] == cfg.image_context_token_id).sum(1)
    if arch == "X":
        assert not pads.any()
    else:  # H: only the thumbnail (one per image) reaches the decoder
        n_images = np.array([len(set(row[row >= 0].tolist())) for row in batch["tile_image"]])
        np.testing.assert_array_equal(pads, n_images * cfg.num_image_tokens)
    assert (n_tiles > 0).any()
    for r in range(6):
        tags = batch["token_tile"][r]
        assert set(tags[tags >= 0].tolist()) == set(range(int(n_tiles[r])))


def test_packing_can_be_turned_off_for_nvlm_d(tok, cfgs):
    batch = next(_pipe(_mixed(packing=False), cfgs["D"], tok))
    assert batch["segment_ids"].max() == 1


def test_same_seed_same_batches_other_seed_other_batches(tok, cfgs):
    a = next(_pipe(_mixed(), cfgs["D"], tok, seed=3))
    b = next(_pipe(_mixed(), cfgs["D"], tok, seed=3))
    c = next(_pipe(_mixed(), cfgs["D"], tok, seed=4))
    _assert_equal_batches(a, b)
    assert not np.array_equal(a["input_ids"], c["input_ids"])


# ------------------------------------------------------------------------------------------
# Checkpointing.


@pytest.mark.parametrize("arch", ["D", "X"])
def test_resuming_from_a_saved_state_yields_the_uninterrupted_batches(tok, cfgs, arch):
    data = _mixed()
    it = _pipe(data, cfgs[arch], tok)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = _pipe(data, cfgs[arch], tok)
    resumed.set_state(state)
    for want in expected:
        _assert_equal_batches(next(resumed), want)
    assert resumed.counts == it.counts and resumed.batches == it.batches == 7
    import json

    json.dumps(state)  # checkpointable as JSON (what grain's Orbax handler writes)


def test_changing_weights_on_resume_keeps_each_source_position(tok, cfgs):
    data = pl.synthetic_data_config({"arithmetic": 1, "word_reversal": 1}, shuffle=False)
    it = _pipe(data, cfgs["D"], tok, batch_size=2, seq_len=64)
    for _ in range(5):
        next(it)
    state = it.get_state()
    seen_before = it.counts
    reweighted = data.with_weights({"arithmetic": 9.0})
    resumed = _pipe(reweighted, cfgs["D"], tok, batch_size=2, seq_len=64)
    resumed.set_state(state)
    for _ in range(40):
        next(resumed)
    new = {s: resumed.counts[s]["seen"] - seen_before[s]["seen"] for s in seen_before}
    assert 0.85 < new["arithmetic"] / sum(new.values()) < 0.95


# ------------------------------------------------------------------------------------------
# Bad records.


@pytest.fixture()
def messy_jsonl(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "wide.png").write_bytes(_png((200, 28)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = {
        "image": "ok.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}],
    }
    text = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
    bad = [
        {"image": "missing.png", "conversations": good["conversations"]},
        {"image": "bad.png", "conversations": good["conversations"]},
        {"image": "wide.png", "conversations": good["conversations"]},  # 7 tiles > 4 per row
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"conversations": [{"from": "human", "value": "long " * 300}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "train.jsonl"
    sources.write_jsonl(str(path), [good, text] * 6 + bad)
    with open(path, "a") as f:
        f.write("{broken json\n")
    return str(path)


def test_bad_records_are_counted_per_source_and_reason_and_never_crash(tok, cfgs, messy_jsonl, caplog):
    data = pl.DataConfig(
        sources=(sources.JsonlSource("messy", {"train": messy_jsonl}), sources.SyntheticSource("shape")),
        max_skip_rate=0.5,
        min_samples_for_skip_check=50,
        log_every_batches=2,
    )
    with caplog.at_level(logging.INFO):
        it = _pipe(data, cfgs["D"], tok, tiles=4)
        for _ in range(6):
            check_batch_semantics(next(it))
    skips = it.skip_counts["messy"]
    for reason in (
        tr.MISSING_IMAGE,
        tr.CORRUPT_IMAGE,
        tr.TOO_MANY_TILES,
        tr.EMPTY_CONVERSATION,
        tr.ANSWER_LESS_TURN,
        tr.TOO_LONG,
        tr.MALFORMED_RECORD,
    ):
        assert skips.get(reason, 0) >= 1, (reason, skips)
    assert "shape" not in it.skip_counts and it.counts["shape"]["seen"] > 0
    assert any("messy:" in r.getMessage() and "missing_image=" in r.getMessage() for r in caplog.records)


def test_a_source_over_the_skip_threshold_stops_the_run_naming_it(tok, cfgs, messy_jsonl):
    data = pl.DataConfig(
        sources=(sources.JsonlSource("messy", {"train": messy_jsonl}), sources.SyntheticSource("colour")),
        max_skip_rate=0.2,
        min_samples_for_skip_check=20,
    )
    it = _pipe(data, cfgs["D"], tok, tiles=4)
    with pytest.raises(mixture.SkipRateExceeded, match=r"(?s)data source 'messy'.*missing_image=") as e:
        for _ in range(50):
            next(it)
    assert "train.jsonl:" in str(e.value)


# ------------------------------------------------------------------------------------------
# Splits, shards, mixture.


def test_eval_split_runs_once_over_held_out_indices_and_pads_the_last_batch(tok, cfgs):
    data = pl.DataConfig(
        sources=(sources.SyntheticSource("colour", eval_size=10),),
        shuffle=False,
        num_epochs=1,
        num_packing_bins=1,
    )
    batches = list(_pipe(data, cfgs["D"], tok, batch_size=4, seq_len=64, split="eval"))
    answers = []
    for b in batches:
        check_batch_semantics(b)
        for r in range(4):
            for s in range(1, b["segment_ids"][r].max() + 1):
                m = (b["segment_ids"][r] == s) & b["loss_mask"][r]
                answers.append(decode(tok, b["targets"][r][m]).removesuffix("<|im_end|>"))
    assert answers == [e.answer for e in synthetic.heldout_examples("colour", 10)]
    assert (batches[-1]["segment_ids"][-1] == 0).all()  # completed with an empty row


def test_shards_read_disjoint_records_and_yield_their_part_of_the_batch(tok, cfgs, tmp_path):
    path = str(tmp_path / "t.jsonl")
    records = [
        {"conversations": [{"from": "human", "value": "Say"}, {"from": "gpt", "value": str(i)}]} for i in range(40)
    ]
    sources.write_jsonl(path, records)
    data = pl.DataConfig(sources=(sources.JsonlSource("t", {"train": path}),), num_epochs=1, packing=False)
    seen = []
    for shard in (0, 1):
        got = set()
        for b in _pipe(data, cfgs["D"], tok, batch_size=4, seq_len=48, shard_index=shard, shard_count=2):
            assert b["input_ids"].shape[0] == 2
            for r in range(2):
                if b["loss_mask"][r].any():
                    got.add(decode(tok, b["targets"][r][b["loss_mask"][r]]).removesuffix("<|im_end|>"))
        seen.append(got)
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {str(i) for i in range(40)}


def test_pipeline_mixture_follows_the_configured_weights(tok, cfgs):
    data = pl.synthetic_data_config({"arithmetic": 3, "word_reversal": 1})
    it = _pipe(data, cfgs["D"], tok, batch_size=8, seq_len=256)
    for _ in range(15):
        next(it)
    seen = {s: c["seen"] for s, c in it.counts.items()}
    assert abs(seen["arithmetic"] / sum(seen.values()) - 0.75) < 0.03


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=3, shard_count=2), "multiple of shard_count"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
        (dict(split="dev"), "unknown synthetic split"),
    ],
)
def test_bad_pipeline_arguments_are_refused(tok, cfgs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _pipe(_mixed(), cfgs["D"], tok, **kwargs)


def test_the_prompt_formats_tile_budget_decides_the_tiling(tok, cfgs, tmp_path):
    """A one-tile row budget with the model's 6-tile budget skips a 3:1 image; a prompt format
    with `max_tiles=1` (stage-1 pretraining) resizes it to one tile instead."""
    (tmp_path / "wide.png").write_bytes(_png((84, 28)))  # 3:1 -> a 3x1 grid + thumbnail under 6 tiles
    record = {"images": [str(tmp_path / "wide.png")], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "green"}]}
    path = sources.write_jsonl(str(tmp_path / "wide.jsonl"), [record] * 4)
    model_budget = pl.DataConfig(sources=(sources.JsonlSource("wide", {"train": path}),), num_epochs=1, packing=False)
    with pytest.raises(ValueError, match="too_many_tiles: 4 tiles"):
        pl.record_batch(record, cfgs["D"], tok, seq_len=SEQ, tiles_per_row=1, data_cfg=model_budget)
    one_tile = dataclasses.replace(model_budget, prompt_format=PromptFormat.for_model(cfgs["D"], max_tiles=1))
    it = _pipe(one_tile, cfgs["D"], tok, batch_size=1, tiles=1)
    batch = next(it)
    assert batch["pixel_values"].shape[1:] == (1, 28, 28, 3) and batch["tile_valid"].all()
    assert (batch["input_ids"] == cfgs["D"].image_context_token_id).sum() == cfgs["D"].num_image_tokens
    assert "<tile_global_thumbnail>" in decode(tok, batch["input_ids"][0]) and not it.skip_counts


def test_a_prompt_format_for_another_tile_size_is_refused(tok, cfgs):
    data = _mixed(prompt_format=PromptFormat(tokens_per_tile=256))
    with pytest.raises(ValueError, match="tokens_per_tile=256 but the model makes 4 image tokens per tile"):
        _pipe(data, cfgs["D"], tok)
    with pytest.raises(ValueError, match="prompt_format must be a PromptFormat"):
        _mixed(prompt_format={"max_tiles": 1})


def test_data_config_checks_names_and_weights():
    with pytest.raises(ValueError, match="unique"):
        pl.DataConfig(sources=(sources.SyntheticSource("colour"), sources.SyntheticSource("colour")))
    with pytest.raises(ValueError, match="unknown sources"):
        _mixed().with_weights({"nope": 1.0})
    assert _mixed().with_weights({"ocr": 5.0}).weights["ocr"] == 5.0


@pytest.mark.slow
def test_worker_processes_give_the_same_kind_of_batches_and_resume_exactly(tok, cfgs):
    data = _mixed(num_workers=2)
    with _pipe(data, cfgs["D"], tok) as it:
        for _ in range(2):
            validate_batch(next(it))
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
        counts = it.counts
    with _pipe(data, cfgs["D"], tok) as resumed:
        resumed.set_state(state)
        for want in expected:
            _assert_equal_batches(next(resumed), want)
        assert resumed.counts == counts
    assert collections.Counter(counts).keys() == {"colour", "shape", "ocr", "chart", "arithmetic"}


def test_reader_threads_do_not_change_the_batches(tok, cfgs):
    plain = _pipe(_mixed(), cfgs["D"], tok)
    threaded = _pipe(_mixed(read_threads=2), cfgs["D"], tok)
    for _ in range(2):
        _assert_equal_batches(next(plain), next(threaded))


def test_resume_is_exact_with_skipped_records_in_the_stream(tok, cfgs, messy_jsonl):
    data = pl.DataConfig(
        sources=(sources.JsonlSource("messy", {"train": messy_jsonl}), sources.SyntheticSource("ocr")),
        max_skip_rate=0.6,
        min_samples_for_skip_check=50,
    )
    it = _pipe(data, cfgs["D"], tok, tiles=4)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = _pipe(data, cfgs["D"], tok, tiles=4)
    resumed.set_state(state)
    for want in expected:
        _assert_equal_batches(next(resumed), want)
    assert resumed.skip_counts == it.skip_counts and it.skip_counts["messy"]


@pytest.mark.parametrize("arch", "DXH")
def test_record_batch_encodes_a_record_exactly_as_the_pipeline(tok, cfgs, tmp_path, arch):
    """`record_batch` (asking a trained model, attribution maps) must see what training saw,
    the data config's prompt format (tags, tile budget, system message) included."""
    image = tmp_path / "im.png"
    image.write_bytes(_png((60, 30)))
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "green"}],
              "images": [str(image)]}
    path = str(tmp_path / "one.jsonl")
    sources.write_jsonl(path, [record])
    fmt = PromptFormat.for_model(cfgs[arch], tag_style="2d_grid", max_tiles=2, system_message="Be brief.")
    data = pl.DataConfig(sources=(sources.JsonlSource("one", {"train": path}),), num_epochs=1, packing=False,
                         shuffle=False, prompt_format=fmt)
    (from_pipeline,) = list(_pipe(data, cfgs[arch], tok, batch_size=1))
    alone = pl.record_batch(record, cfgs[arch], tok, seq_len=SEQ, tiles_per_row=TILES, data_cfg=data)
    _assert_equal_batches(alone, from_pipeline)
    assert alone["tile_valid"].sum() == 3  # 2x1 grid + thumbnail under the budget of 2
    text = decode(tok, alone["input_ids"][0])
    assert "Be brief." in text and "<tile_x2_y1>" in text
    with pytest.raises(ValueError, match="cannot encode the question"):
        pl.record_batch({"conversations": [{"from": "human", "value": "hi"}], "images": [str(image)]}, cfgs[arch],
                        tok, seq_len=SEQ, tiles_per_row=TILES, what="question")
