"""Tests for nvlm_jax.data.sources: JSONL, ArrayRecord, TFDS (without TensorFlow) and synthetic sources."""

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from nvlm_jax import config as config_lib
from nvlm_jax.data import pipeline, sources
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def _png(size=(30, 20), colour=(200, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


class NvlmTestVqa(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dataset: PNG image + question + answer, stored as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(encoding_format="png"),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png((40 + 4 * i, 28)), "question": f"question {i}", "answer": f"answer {i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    NvlmTestVqa(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


# ------------------------------------------------------------------------------------------
# JSONL.


def test_index_lines_skips_blank_lines_and_handles_crlf_and_no_final_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n   \n{"b": 2}\n\r\n{"c": 3}')
    starts, lengths, lines = sources.index_lines(str(path))
    data = path.read_bytes()
    assert [data[s : s + n].strip() for s, n in zip(starts, lengths, strict=True)] == [
        b'{"a": 1}',
        b'{"b": 2}',
        b'{"c": 3}',
    ]
    assert lines.tolist() == [1, 4, 6]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert sources.index_lines(str(empty))[0].size == 0


def test_jsonl_source_labels_records_by_file_and_line_and_pickles(tmp_path):
    path = str(tmp_path / "d.jsonl")
    sources.write_jsonl(path, [{"conversations": CONV, "image": "x.png"}, {"conversations": CONV}])
    src = sources.JsonlDataSource(path)
    assert len(src) == 2
    label, line = src[1]
    assert label == f"{path}:2" and b'"conversations"' in line
    clone = pickle.loads(pickle.dumps(src))
    assert clone[0] == src[0]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.JsonlDataSource(str(tmp_path / "nope.jsonl"))


def test_jsonl_source_close_releases_its_descriptor_and_reads_reopen_it(tmp_path):
    path = sources.write_jsonl(str(tmp_path / "d.jsonl"), [{"conversations": CONV}])
    src = sources.JsonlDataSource(path)
    first = src[0]
    fd = src._fd
    src.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert src[0] == first


def test_a_jsonl_pipeline_exits_without_finalizer_errors(tmp_path):
    """The open JSONL descriptor is closed quietly at interpreter exit (no "Exception ignored")."""
    text_only = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    script = f"""
import os
from nvlm_jax import config as config_lib
from nvlm_jax.data import pipeline, sources
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer
path = sources.write_jsonl({str(tmp_path / "train.jsonl")!r}, [{{"conversations": {text_only!r}}}] * 4)
tok = load_tokenizer(make_tiny_tokenizer({str(tmp_path / "tok")!r}))
model = pipeline.config_for_tokenizer(config_lib.tiny("D"), tok)
data = pipeline.DataConfig(sources=(sources.JsonlSource("j", {{"train": path}}),), read_threads=1)
it = pipeline.make_pipeline(data, model, tok, split="train", seed=0, batch_size=2, seq_len=64, tiles_per_row=1)
next(it)
print("read a batch")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "read a batch" in run.stdout, run.stderr
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_jsonl_source_resolves_relative_images_against_the_file_folder(tmp_path):
    path = str(tmp_path / "train.jsonl")
    sources.write_jsonl(
        path,
        [
            {"conversations": CONV, "image": "imgs/a.png"},
            {"conversations": CONV, "image": ["/abs/b.png", "c.png"]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        ],
    )
    spec = sources.JsonlSource("mine", {"train": path})
    parse = spec.parser("train")
    samples = [parse.map(spec.open("train")[i]) for i in range(3)]
    real = os.path.realpath(tmp_path)
    assert samples[0].images == (os.path.join(real, "imgs/a.png"),)
    assert samples[1].reason == "unsafe_image_path" and "/abs/b.png" in samples[1].detail
    lenient = sources.JsonlSource("mine", {"train": path}, allow_outside_root=True).parser("train")
    assert lenient.map(spec.open("train")[1]).images == ("/abs/b.png", os.path.join(str(tmp_path), "c.png"))
    assert samples[2].images == () and samples[2].source == "mine"
    rooted = sources.JsonlSource("mine", {"train": path}, image_root="/data").parser("train")
    assert rooted.map(spec.open("train")[0]).images == ("/data/imgs/a.png",)


def test_unknown_split_names_the_source_and_its_splits(tmp_path):
    spec = sources.JsonlSource("coco", {"train": str(tmp_path / "t.jsonl")})
    with pytest.raises(ValueError, match="'coco' has no split 'eval'.*'train'"):
        spec.open("eval")


def test_bad_spec_fields_are_refused():
    with pytest.raises(ValueError, match="weight must be > 0"):
        sources.JsonlSource("a", {}, weight=0)
    with pytest.raises(ValueError, match="without '/'"):
        sources.JsonlSource("a/b", {})
    with pytest.raises(ValueError, match="unknown synthetic task"):
        sources.SyntheticSource("nope")


# ------------------------------------------------------------------------------------------
# ArrayRecord.


def test_array_record_source_roundtrips_msgpack_records_with_image_bytes(tmp_path):
    path = str(tmp_path / "data.array_record")
    png = _png()
    sources.write_array_record(path, [sources.encode_record(CONV, [png]), sources.encode_record(CONV[:1] + CONV[1:])])
    spec = sources.ArrayRecordSource("ar", {"train": path})
    src = spec.open("train")
    assert len(src) == 2
    first = spec.parser("train").map(src[0])
    assert isinstance(first, tr.RawSample) and first.images == (png,)
    assert first.record == f"{path}#0"
    assert first.conversation[1]["value"] == "red"
    loaded = tr.LoadImages().map(first)
    assert loaded.images[0].size == (30, 20)


# ------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_source_reads_array_record_splits_without_tensorflow(tfds_dir):
    spec = sources.TfdsSource("vqa", "nvlm_test_vqa", data_dir=tfds_dir, question_template="Question: {question}")
    train, val = spec.open("train"), spec.open("eval")
    assert (len(train), len(val)) == (6, 2)
    label, features = train[0]
    assert label == "tfds:nvlm_test_vqa/train#0"
    assert isinstance(features["image"], bytes)  # read undecoded
    sample = spec.parser("train").map(train[0])
    question, answer = sample.conversation[0]["value"], sample.conversation[1]["value"]
    assert question.startswith("<image>\nQuestion: question ")
    assert answer == "answer " + question.rsplit(" ", 1)[1]
    image = tr.LoadImages().map(sample).images[0]
    assert image.height == 28 and image.mode == "RGB"


def test_tfds_dataset_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'no_such_ds'"):
        sources.TfdsSource("x", "no_such_ds", data_dir=str(tmp_path)).open("train")


def test_tfds_source_feeds_the_pipeline(tfds_dir, tok):
    cfg = pipeline.config_for_tokenizer(config_lib.tiny("D"), tok)
    data = pipeline.DataConfig(sources=(sources.TfdsSource("vqa", "nvlm_test_vqa", data_dir=tfds_dir),))
    it = pipeline.make_pipeline(data, cfg, tok, split="train", seed=0, batch_size=2, seq_len=128, tiles_per_row=8)
    batch = next(it)
    assert batch["tile_valid"].any() and batch["loss_mask"].any()
    assert it.counts["vqa"]["seen"] >= 2 and not it.skip_counts


# ------------------------------------------------------------------------------------------
# Synthetic.


def test_synthetic_source_defaults_its_name_to_the_task_and_scales_images_with_tiles():
    spec = sources.SyntheticSource("colour", train_size=10, eval_size=4)
    assert spec.name == "colour"
    assert len(spec.open("train", tile_size=28)) == 10 and len(spec.open("eval", tile_size=28)) == 4
    _, record = spec.open("train", tile_size=56)[0]
    assert record["images"][0].size == (56, 56)
    assert np.asarray(record["images"][0]).dtype == np.uint8
