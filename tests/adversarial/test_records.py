"""Hostile records through every source format: the per-record steps never raise, every bad
record becomes a counted skip with a reason, and a whole pipeline counts each record once.

Generated with hypothesis: random JSON shapes (keys drawn from the ones the parsers look at),
unicode edge cases (lone surrogates, NUL, RTL marks, the template's special tokens), odd
types, huge strings, garbage bytes and image references that escape the image root.
"""

import base64
import io
import json
import random

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nvlm_jax import config as config_lib
from nvlm_jax.data import formats, parsing, sources
from nvlm_jax.data import pipeline as pl
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

SEQ, TILES = 160, 8
NASTY = ["\ud800", "q\udfff", "\x00", "\u202e", "<|im_start|>assistant\n", "<|vision_pad|>", "<image>",
         "<Image></Image>", "<tile_1>", "x" * 20_000, "", " ", "\n", "😀" * 50, "\ufeff"]
KEYS = ["conversations", "messages", "image", "images", "from", "value", "role", "content", "type", "text"]
ROLES = ["human", "gpt", "user", "assistant", "system", "tool", "", None, 3]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()

texts = st.one_of(st.text(st.characters(exclude_categories=()), max_size=40), st.sampled_from(NASTY))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | texts, inner,
                                                                         max_size=4), max_leaves=12)
image_refs = st.sampled_from(["pic.png", "../outside.png", "/etc/passwd", "sub/../pic.png", "missing.png", "",
                              "link/outside.png", 7, None, [], ["pic.png", "pic.png"]])
turns = st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": st.one_of(texts, json_values)})
conversations = st.fixed_dictionaries({"conversations": st.lists(turns, max_size=4), "image": image_refs})
records = st.one_of(conversations, json_values, st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3))

# OpenAI / HF chat messages: content strings or part lists, image parts with inline refs, URLs
# (data:, file://, http) and top-level image lists.
url_refs = st.sampled_from(["https://example.com/a.png", "http://127.0.0.1/x.png", "gs://b/a.png",
                            "data:image/png;base64," + base64.b64encode(PNG).decode(), "data:image/png;base64,@@",
                            "data:,not%20an%20image", "data:nocomma", "file:///etc/passwd", "file://host/a.png",
                            "file://localhost/x.png", "FILE:///x.png", "pic.png", "", None, 5])
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_values)}),
    st.fixed_dictionaries({"type": st.just("image")}),
    st.fixed_dictionaries({"type": st.just("image"), "image": st.one_of(image_refs, url_refs)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.one_of(url_refs, st.fixed_dictionaries({"url": url_refs}), json_values)}),
    st.fixed_dictionaries({"type": st.sampled_from(["video", "input_text", None, 3])}),
    json_values)
messages = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES),
                                                 "content": st.one_of(texts, st.lists(parts, max_size=4),
                                                                      json_values)}), max_size=4)},
    optional={"images": st.one_of(image_refs, st.lists(st.one_of(image_refs, url_refs), max_size=3)),
              "system": texts, "conversations": json_values})
any_records = st.one_of(records, messages)
record_formats = st.sampled_from(formats.RECORD_FORMATS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    tok = load_tokenizer(make_tiny_tokenizer(folder / "tok"))
    cfg = pl.config_for_tokenizer(config_lib.tiny("D"), tok)
    root = folder / "images"
    root.mkdir()
    (root / "pic.png").write_bytes(PNG)
    (root / "link").symlink_to(folder)  # a way out of the root
    (folder / "outside.png").write_bytes(PNG)
    steps = pl.record_transforms(cfg, tok, seq_len=SEQ, tiles_per_row=TILES, pad_id=0)
    return dict(tok=tok, cfg=cfg, root=str(root), steps=steps, folder=folder)


def _run(steps, parser, element):
    out = tr.Guarded(parser).map(element)
    for step in steps:
        out = step.map(out)
    assert isinstance(out, tr.Example | tr.Skipped), type(out)
    if isinstance(out, tr.Skipped):
        assert out.reason in tr.SKIP_REASONS and out.record == element[0]
        assert "outside.png" not in str(out.detail) or out.reason == tr.UNSAFE_IMAGE_PATH
    return out


FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FUZZ
@given(record=records, garbage=st.binary(max_size=64), as_garbage=st.booleans())
def test_jsonl_lines(setup, record, garbage, as_garbage):
    line = garbage if as_garbage else json.dumps(record).encode()
    _run(setup["steps"], parsing.ParseJsonLine("jsonl", setup["root"]), ("f.jsonl:1", line))


@FUZZ
@given(record=records, garbage=st.binary(max_size=64), as_garbage=st.booleans())
def test_array_record_payloads(setup, record, garbage, as_garbage):
    try:
        payload = garbage if as_garbage else msgpack.packb(record, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        payload = garbage  # msgpack cannot even store it: garbage it is
    _run(setup["steps"], parsing.ParseMsgpackRecord("arrayrecord", setup["root"]), ("f.ar:1", payload))


@FUZZ
@given(record=records)
def test_record_dicts(setup, record):
    _run(setup["steps"], parsing.ParseRecordDict("dicts", setup["root"]), ("dict:1", record))


@FUZZ
@given(record=any_records, record_format=record_formats)
def test_chat_message_lines(setup, record, record_format):
    line = json.dumps(record).encode()
    _run(setup["steps"], parsing.ParseJsonLine("chat", setup["root"], record_format=record_format), ("c.jsonl:1", line))


@FUZZ
@given(record=any_records, record_format=record_formats, garbage=st.binary(max_size=64), as_garbage=st.booleans())
def test_array_record_json_payloads(setup, record, record_format, garbage, as_garbage):
    payload = b"{" + garbage if as_garbage else json.dumps(record).encode()
    parser = parsing.ParseMsgpackRecord("arrayrecord", setup["root"], record_format=record_format)
    _run(setup["steps"], parser, ("f.ar:1", payload))


@FUZZ
@given(record=any_records, record_format=record_formats)
def test_json_list_records(setup, record, record_format):
    parser = parsing.ParseRecordDict("jsonlist", setup["root"], record_format=record_format)
    _run(setup["steps"], parser, ("f.json#1", record))


@FUZZ
@given(turns=st.one_of(texts, json_values, st.binary(max_size=16), any_records.map(json.dumps)),
       key=st.sampled_from(["conversations", "messages"]), record_format=record_formats,
       image=st.sampled_from([PNG, b"not a png", None, [PNG, PNG], "pic.png", "../outside.png"]))
def test_tfds_conversation_features(setup, turns, key, record_format, image):
    parser = parsing.ParseTfdsExample("tfds", record_format=record_format, image_root=setup["root"])
    _run(setup["steps"], parser, ("tfds:2", {"image": image, key: turns}))


@FUZZ
@given(question=st.one_of(texts, json_values, st.binary(max_size=16)), answer=st.one_of(texts, json_values),
       image=st.sampled_from([PNG, b"not a png", np.zeros((5, 5, 3), np.uint8), np.zeros((2, 2), np.float32),
                              None, [PNG, PNG], "pic.png"]))
def test_tfds_examples(setup, question, answer, image):
    features = {"image": image, "question": question, "answer": answer}
    _run(setup["steps"], parsing.ParseTfdsExample("tfds"), ("tfds:1", features))


def test_the_lone_surrogate_record_of_the_report_is_a_counted_skip(setup):
    line = b'{"conversations":[{"from":"human","value":"q\\ud800"},{"from":"gpt","value":"a"}]}'
    out = _run(setup["steps"], parsing.ParseJsonLine("jsonl", setup["root"]), ("f.jsonl:7", line))
    assert out.reason == tr.MALFORMED_RECORD and "surrogate" in out.detail


def test_an_unforeseen_exception_in_a_step_is_a_record_error_skip():
    class Boom:
        source = "src"

        def map(self, element):
            raise RuntimeError("kaboom")

    out = tr.Guarded(Boom()).map(("f:3", b"{}"))
    assert (out.source, out.record, out.reason) == ("src", "f:3", tr.RECORD_ERROR)
    assert "Boom: RuntimeError: kaboom" in out.detail


def test_a_whole_pipeline_counts_every_record_once(setup):
    """Hundreds of hostile lines between good ones: the iterator ends normally and
    seen = kept + skipped, with kept equal to the rows it produced."""
    rng = random.Random(0)
    good = {"conversations": [{"from": "human", "value": "<image>\ncolour?"}, {"from": "gpt", "value": "red"}],
            "image": "pic.png"}
    bad = [b'{"conversations":[{"from":"human","value":"q\\ud800"},{"from":"gpt","value":"a"}]}', b"{oops",
           json.dumps({"conversations": "no"}).encode(), json.dumps({**good, "image": "../outside.png"}).encode(),
           json.dumps({**good, "image": "/etc/passwd"}).encode(), json.dumps([1, 2]).encode(),
           json.dumps({**good, "image": "missing.png"}).encode(), b"\xff\xfe\x00"]
    lines = []
    for i in range(400):
        lines.append(json.dumps(good).encode() if i % 3 == 0 or i == 399 else rng.choice(bad))
    path = setup["folder"] / "images" / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    spec = sources.JsonlSource("hostile", {"train": str(path)})
    data = pl.DataConfig(sources=(spec,), packing=False, shuffle=False, num_epochs=1, max_skip_rate=1.0)
    rows = 0
    with pl.make_pipeline(data, setup["cfg"], setup["tok"], split="train", seed=0, batch_size=4, seq_len=SEQ,
                          tiles_per_row=TILES) as it:
        for batch in it:
            rows += int((batch["segment_ids"].max(axis=1) > 0).sum())
        counts = it.counts["hostile"]
    skipped = sum(n for reason, n in counts.items() if reason != "seen")
    assert counts["seen"] == len(lines)
    assert rows == counts["seen"] - skipped == sum(1 for line in lines if line == json.dumps(good).encode())
    assert counts[tr.UNSAFE_IMAGE_PATH] > 0 and counts[tr.MALFORMED_RECORD] > 0 and counts[tr.MISSING_IMAGE] > 0
