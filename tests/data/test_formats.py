"""Tests for nvlm_jax.data.formats: every record format (LLaVA, ShareGPT, OpenAI/HF chat
messages with content parts, image URLs) and every container (JSONL, JSON list, ArrayRecord of
JSON or msgpack, a TFDS builder) gives the same training example."""

import base64
import io
import json

import msgpack
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from nvlm_jax import config as config_lib
from nvlm_jax.data import files, formats, parsing, sources
from nvlm_jax.data import pipeline as pl
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

QUESTION, ANSWER = "What colour is the square?", "red"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (220, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
LLAVA = {"image": "images/red.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                      {"from": "gpt", "value": ANSWER}]}


def _messages(image_part: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [image_part, {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], **extra}


class NvlmTestChat(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dataset whose records are chat messages (JSON text) and a PNG."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(encoding_format="png"),
                                               "messages": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"image": PNG, "messages": json.dumps(_messages({"type": "image"})["messages"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    tok = load_tokenizer(make_tiny_tokenizer(folder / "tok"))
    cfg = pl.config_for_tokenizer(config_lib.tiny("D"), tok)
    (folder / "images").mkdir()
    (folder / "images" / "red.png").write_bytes(PNG)
    steps = pl.record_transforms(cfg, tok, seq_len=64, tiles_per_row=2, pad_id=0)
    return dict(root=folder, steps=steps)


def _example(steps, spec, split="train"):
    records = spec.open(split)
    out = tr.Guarded(spec.parser(split)).map(records[0])
    for step in steps:
        out = step.map(out)
    assert isinstance(out, tr.Example), out
    return out


def _containers(root):
    """`{name: data entry}`: the same record in every format and container."""
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    sharegpt = {"conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                  {"from": "chatgpt", "value": ANSWER}], "images": ["images/red.png"]}
    jsonl = {
        "llava": LLAVA,
        "sharegpt": sharegpt,
        "messages_image": _messages({"type": "image"}, images=["images/red.png"]),
        "messages_inline": _messages({"type": "image", "image": "images/red.png"}),
        "messages_url": _messages({"type": "image_url", "image_url": {"url": "images/red.png"}}),
        "messages_file_url": _messages({"type": "image_url", "image_url": f"file://{root}/images/red.png"}),
        "messages_data_url": _messages({"type": "image_url", "image_url": {"url": data_url}}),
        "conversations_with_parts": {"conversations": _messages({"type": "image"})["messages"],
                                     "images": ["images/red.png"]},
        "messages_string": {"messages": [{"role": "user", "content": f"<image>\n{QUESTION}"},
                                         {"role": "assistant", "content": ANSWER}], "images": ["images/red.png"]},
    }
    entries = {}
    for name, record in jsonl.items():
        sources.write_jsonl(str(root / f"{name}.jsonl"), [record])
        entries[name] = str(root / f"{name}.jsonl")
    (root / "list.json").write_text(json.dumps([_messages({"type": "image"}, images=["images/red.png"])], indent=1))
    entries["json_list"] = str(root / "list.json")
    sources.write_array_record(str(root / "json.array_record"), [json.dumps(LLAVA).encode()])
    entries["arrayrecord_json"] = str(root / "json.array_record")
    sources.write_array_record(str(root / "msgpack.bin"), [sources.encode_record(LLAVA["conversations"], [PNG])])
    entries["arrayrecord_msgpack"] = str(root / "msgpack.bin")  # detected by its riegeli signature
    entries["tfds"] = "tfds:nvlm_test_chat:train"
    return entries


def test_every_format_and_container_gives_the_same_example(setup, tmp_path_factory):
    root = setup["root"]
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    NvlmTestChat(data_dir=tfds_dir, file_format="array_record").download_and_prepare()
    entries = _containers(root)
    examples = {}
    for name, entry in entries.items():
        (spec,) = files.file_sources(entry, "train", image_root=str(root), tfds_data_dir=tfds_dir)
        examples[name] = _example(setup["steps"], spec)
    kinds = {n: type(s).__name__ for n in entries for s in files.file_sources(entries[n], "train",
                                                                             tfds_data_dir=tfds_dir)}
    assert kinds["json_list"] == "JsonArraySource" and kinds["tfds"] == "TfdsSource"
    assert kinds["arrayrecord_msgpack"] == kinds["arrayrecord_json"] == "ArrayRecordSource"
    reference = examples.pop("llava")
    for name, ex in examples.items():
        for field in ("input_ids", "targets", "loss_mask", "token_image", "token_tile", "pixels", "tile_image"):
            np.testing.assert_array_equal(getattr(ex, field), getattr(reference, field), err_msg=f"{name}: {field}")


def test_message_parts_join_with_newlines_and_take_the_listed_images_in_order():
    record = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                     {"type": "image", "url": "inline.png"}, {"type": "image"}]},
        {"role": "assistant", "content": "both"}], "images": ["first.png", "second.png"]}
    out = formats.canonical_record(record)
    assert [t["value"] for t in out["conversations"]] == ["Be brief.", "<image>\nand\n<image>\n<image>", "both"]
    assert out["images"] == ["first.png", "inline.png", "second.png"]


def test_sharegpt_system_field_becomes_a_leading_system_turn():
    out = formats.canonical_record({"system": "S", "conversations": [{"from": "human", "value": "q"},
                                                                     {"from": "bard", "value": "a"}]})
    assert out["conversations"] == [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize("record, reason, words", [
    (_messages({"type": "image"}), tr.IMAGE_PLACEHOLDER_MISMATCH, "more images than the record has"),
    (_messages({"type": "image"}, images=["a.png", "b.png"]), tr.IMAGE_PLACEHOLDER_MISMATCH, "not referenced"),
    (_messages({"type": "video"}), tr.MALFORMED_RECORD, "not a text/image/image_url part"),
    (_messages({"type": "text", "text": 3}), tr.MALFORMED_RECORD, "without a 'text' string"),
    (_messages({"type": "image_url", "image_url": {}}), tr.MALFORMED_RECORD, "without a url"),
    (_messages({"type": "image_url", "image_url": "https://example.com/a.png"}), tr.REMOTE_IMAGE, "not fetched"),
    (_messages({"type": "image_url", "image_url": "gs://bucket/a.png"}), tr.REMOTE_IMAGE, "not fetched"),
    (_messages({"type": "image_url", "image_url": "data:image/png;base64,@@@"}), tr.MALFORMED_RECORD, "base64"),
    (_messages({"type": "image_url", "image_url": "file://host/a.png"}), tr.MALFORMED_RECORD, "names a host"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image"}]}], "images": ["a.png"]},
     tr.MALFORMED_RECORD, "image part in a 'assistant' turn"),
    ({"conversations": []}, tr.MALFORMED_RECORD, "no 'messages' field (a messages record)"),
])
def test_bad_chat_records_are_skips_with_a_reason(tmp_path, record, reason, words):
    fmt = "messages" if "no 'messages'" in words else "auto"
    out = parsing.ParseJsonLine("chat", str(tmp_path), record_format=fmt).map(("c.jsonl:2", json.dumps(record)))
    assert isinstance(out, tr.Skipped) and out.reason == reason and out.record == "c.jsonl:2", out
    assert words in out.detail


def test_file_urls_stay_under_the_image_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    record = _messages({"type": "image_url", "image_url": f"file://{tmp_path}/secret.png"})
    out = parsing.ParseJsonLine("chat", str(root)).map(("l", json.dumps(record)))
    assert out.reason == tr.UNSAFE_IMAGE_PATH


def test_array_record_payloads_may_be_json_or_msgpack():
    parse = parsing.ParseMsgpackRecord("ar", "/root")
    as_json = parse.map(("f#0", json.dumps(LLAVA).encode()))
    as_msgpack = parse.map(("f#1", msgpack.packb(LLAVA)))
    assert as_json.conversation == as_msgpack.conversation and as_json.images == as_msgpack.images
    assert parse.map(("f#2", b"{broken")).reason == tr.MALFORMED_RECORD


def test_unknown_record_format_is_refused():
    with pytest.raises(ValueError, match="record format must be one of"):
        sources.JsonlSource("a", {"train": "a.jsonl"}, record_format="alpaca")
