"""Tests for nvlm_jax.data.files: command-line data entries -> sources, mixed by weight, with
image paths confined to the image root."""

import io
import os

import pytest
from PIL import Image

from nvlm_jax import config as config_lib
from nvlm_jax.data import files, sources
from nvlm_jax.data import pipeline as pl
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer, tiling


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (30, 170, 60)).save(buf, "PNG")
    return buf.getvalue()


def _record(image, answer="green"):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                              {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    return pl.config_for_tokenizer(config_lib.tiny("D"), tok), tok


def test_entries_carry_prefixes_locations_and_weights():
    a, b, c, d = files.parse_entries("a.jsonl:3, messages:dir/b.json,tfds:vqa/cfg:1.0.0:validation:0.5,arrayrecord:x")
    assert (a.location, a.weight, a.container, a.record_format) == ("a.jsonl", 3.0, None, "")
    assert (b.location, b.weight, b.record_format) == ("dir/b.json", 1.0, "messages")
    assert (c.container, c.location, c.weight) == ("tfds", "vqa/cfg:1.0.0:validation", 0.5)
    assert (d.container, d.location) == ("arrayrecord", "x")
    assert files.parse_entries(["a.jsonl:2", "b.jsonl,c.jsonl"])[2].location == "c.jsonl"


@pytest.mark.parametrize("value, words", [
    ("", "no data entries"), ("a.jsonl:0", "weight must be > 0"), ("jsonl:arrayrecord:a", "two containers"),
    ("llava:messages:a.jsonl", "two record formats"), ("messages:", "names no file"),
])
def test_bad_entries_are_named_errors(value, words):
    with pytest.raises(ValueError, match=words):
        files.parse_entries(value)


def test_containers_are_detected_by_extension_then_content(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.json").write_text('\ufeff [{"conversations": []}]')
    (tmp_path / "c.data").write_text('{"conversations": []}\n')
    sources.write_array_record(str(tmp_path / "d.bin"), [b"{}"])
    (tmp_path / "e.txt").write_text("hello")
    assert [files.detect_container(str(tmp_path / n)) for n in ("a.jsonl", "b.json", "c.data", "d.bin")] == [
        "jsonl", "json", "jsonl", "arrayrecord"]
    with pytest.raises(ValueError, match="cannot tell the format of data file .*e.txt"):
        files.detect_container(str(tmp_path / "e.txt"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        files.file_sources(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(ValueError, match="is a folder"):
        files.file_sources(str(tmp_path), "train")


def test_sources_are_named_after_their_files_uniquely(tmp_path):
    (tmp_path / "x").mkdir()
    for p in ("train.jsonl", "x/train.jsonl"):
        (tmp_path / p).write_text("{}\n")
    specs = files.file_sources(f"{tmp_path}/train.jsonl:2,{tmp_path}/x/train.jsonl,tfds:my_ds/cfg", "eval",
                               image_root=str(tmp_path), record_format="llava")
    assert [s.name for s in specs] == ["train", "train_2", "my_ds_cfg"]
    assert [s.weight for s in specs] == [2.0, 1.0, 1.0]
    assert specs[0].paths == {"eval": f"{tmp_path}/train.jsonl"} and specs[0].record_format == "llava"
    assert specs[2].splits == {"eval": "validation"} and specs[2].tfds_name == "my_ds/cfg"


def test_weights_mix_as_given(tmp_path, model):
    cfg, tok = model
    (tmp_path / "g.png").write_bytes(_png())
    sources.write_jsonl(str(tmp_path / "a.jsonl"), [_record("g.png", "a")] * 5)
    sources.write_jsonl(str(tmp_path / "b.jsonl"), [_record("g.png", "b")] * 5)
    specs = files.file_sources(f"{tmp_path}/a.jsonl:3,{tmp_path}/b.jsonl", "train")
    data = pl.DataConfig(sources=specs, packing=False)
    with pl.make_pipeline(data, cfg, tok, split="train", seed=0, batch_size=8, seq_len=64, tiles_per_row=1) as it:
        for _ in range(5):
            next(it)
        counts = it.counts
    assert counts["a"]["seen"] + counts["b"]["seen"] == 40
    assert counts["a"]["seen"] == 30 and counts["b"]["seen"] == 10  # 3:1 over every 4 draws


def test_escaping_image_references_are_refused_counted_and_never_read(tmp_path, model, monkeypatch):
    cfg, tok = model
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (root / "link").symlink_to(tmp_path)
    bad = ["../secret.png", str(tmp_path / "secret.png"), "link/secret.png", f"file://{tmp_path}/secret.png"]
    records = [_record(ref) for ref in bad]
    records.append({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/x.png"}}, {"type": "text", "text": "Colour?"}]},
                                 {"role": "assistant", "content": "green"}]})
    records.append(_record("ok.png"))  # last: skips are counted with the next kept record
    sources.write_jsonl(str(tmp_path / "data.jsonl"), records)
    opened = []
    real_open = tiling.open_image
    monkeypatch.setattr(tiling, "open_image", lambda ref, **kw: opened.append(ref) or real_open(ref, **kw))
    specs = files.file_sources(str(tmp_path / "data.jsonl"), "train", image_root=str(root))
    data = pl.DataConfig(sources=specs, packing=False, shuffle=False, num_epochs=1, max_skip_rate=1.0)
    rows = 0
    with pl.make_pipeline(data, cfg, tok, split="train", seed=0, batch_size=2, seq_len=64, tiles_per_row=1) as it:
        for batch in it:
            rows += int((batch["loss_mask"].sum(axis=1) > 0).sum())
        counts = it.counts["data"]
    assert rows == 1
    assert counts == {"seen": 6, tr.UNSAFE_IMAGE_PATH: 4, tr.REMOTE_IMAGE: 1}
    assert [r for r in opened if not isinstance(r, Image.Image)] == [os.path.realpath(root / "ok.png")]
    # The documented opt-out reads them.
    (spec,) = files.file_sources(str(tmp_path / "data.jsonl"), "train", image_root=str(root),
                                 allow_outside_root=True)
    records = spec.open("train")
    assert isinstance(spec.parser("train").map(records[0]), tr.RawSample)


def test_a_json_list_that_is_not_a_list_is_a_named_error(tmp_path):
    (tmp_path / "d.json").write_text('[1, 2')
    (spec,) = files.file_sources(str(tmp_path / "d.json"), "train")
    with pytest.raises(ValueError, match="d.json cannot be read"):
        spec.open("train")
