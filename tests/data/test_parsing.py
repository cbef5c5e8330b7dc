"""Tests for nvlm_jax.data.parsing: source payloads -> RawSample, malformed records as skips."""

import json
import os

import numpy as np
import pytest

from nvlm_jax.data import parsing
from nvlm_jax.data import transforms as tr


def test_parse_json_line_reports_invalid_json_and_missing_fields():
    parse = parsing.ParseJsonLine("coco", "/root")
    bad = parse.map(("f.jsonl:3", b"{not json"))
    assert bad.reason == tr.MALFORMED_RECORD and "invalid JSON" in bad.detail and bad.record == "f.jsonl:3"
    assert parse.map(("f:4", b'{"image": "a.png"}')).detail == "no 'conversations' field"
    assert "not a list" in parse.map(("f:5", b'{"conversations": "hi"}')).detail
    ok = parse.map(("f:6", b'{"image": null, "conversations": [{"from": "human", "value": "q"}]}'))
    assert isinstance(ok, tr.RawSample) and ok.images == ()


def test_relative_image_paths_resolve_against_the_image_root(tmp_path):
    line = b'{"image": ["a.png", "sub/../b.png"], "conversations": []}'
    sample = parsing.ParseJsonLine("coco", str(tmp_path)).map(("f:1", line))
    real = os.path.realpath(tmp_path)
    assert sample.images == (f"{real}/a.png", f"{real}/b.png")


@pytest.mark.parametrize("ref", ["../secret.png", "/etc/passwd", "sub/../../x.png", "link/outside.png", "a\0b"])
def test_image_paths_that_escape_the_root_are_skipped_and_never_read(tmp_path, ref):
    root = tmp_path / "images"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink out of the root
    line = json.dumps({"image": ref, "conversations": []}).encode()
    skipped = parsing.ParseJsonLine("coco", str(root)).map(("f:1", line))
    assert skipped.reason == tr.UNSAFE_IMAGE_PATH and "f:1" == skipped.record
    allowed = parsing.ParseJsonLine("coco", str(root), allow_outside_root=True).map(("f:1", line))
    if "\0" not in ref:
        assert len(allowed.images) == 1  # the documented escape hatch


def test_images_that_are_not_a_list_are_malformed():
    skipped = parsing.ParseJsonLine("coco", "/r").map(("f:1", b'{"images": {"a": 1}, "conversations": []}'))
    assert skipped.reason == tr.MALFORMED_RECORD and "not a list" in skipped.detail


def test_parse_tfds_example_uses_the_first_of_several_answers():
    parse = parsing.ParseTfdsExample("vqa", question_template="Q: {question}")
    sample = parse.map(("l", {"image": b"png", "question": b"why?", "answer": np.array([b"a1", b"a2"], object)}))
    assert sample.conversation[0]["value"] == "<image>\nQ: why?"
    assert sample.conversation[1]["value"] == "a1" and sample.images == (b"png",)
    missing = parse.map(("l", {"image": b"png", "question": b"q"}))
    assert missing.reason == tr.MALFORMED_RECORD and "answer" in missing.detail


def test_corrupt_msgpack_record_is_a_skip_not_a_crash():
    skipped = parsing.ParseMsgpackRecord("ar").map(("f#3", b"\xc1 not msgpack"))
    assert isinstance(skipped, tr.Skipped) and skipped.reason == tr.MALFORMED_RECORD and skipped.record == "f#3"


def test_record_dicts_with_unsupported_image_references_are_malformed():
    out = parsing.ParseRecordDict("syn").map(("r", {"conversations": [], "images": [3.5]}))
    assert out.reason == tr.MALFORMED_RECORD and "unsupported image reference" in out.detail
