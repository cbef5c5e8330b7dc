"""Eval tasks: the release prompts per benchmark, the JSONL data format, scoring rules."""

import json

import pytest
from PIL import Image

from nvlm_jax.eval import report, tasks
from nvlm_jax.eval.tasks import Sample


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_short_answer_benchmarks_use_the_release_vqa_prompt():
    sample = Sample("1", "What is on the sign?", ("stop",))
    for name in ("vqav2", "textvqa", "chartqa", "docvqa", "infovqa"):
        assert tasks.get_task(name).prompt(sample) == (
            "What is on the sign?\nAnswer the question using a single word or phrase.")


def test_multiple_choice_prompt_lists_lettered_options_then_the_instruction():
    sample = Sample("1", "Which stage comes first?", ("A",), options=("egg", "larva", "adult"), hint="A life cycle.")
    text = tasks.get_task("ai2d").prompt(sample)
    assert text == ("Which stage comes first?\nHint: A life cycle.\nA. egg\nB. larva\nC. adult\n"
                    "Answer with the option's letter from the given choices directly.")
    assert tasks.get_task("mmmu").prompt(sample) == text
    assert tasks.get_task("mmmu").prompt(Sample("2", "Compute x.", ("4",))) == (
        "Compute x.\nAnswer the question directly.")


def test_ocrbench_and_synthetic_tasks_ask_the_raw_question():
    sample = Sample("1", "what is written in the image?", ("hello",))
    assert tasks.get_task("ocrbench").prompt(sample) == "what is written in the image?"
    assert tasks.get_task("synthetic_colour").prompt(sample) == "what is written in the image?"


def test_every_table7_benchmark_and_synthetic_task_is_registered():
    assert set(report.BENCHMARKS) <= set(tasks.TASKS)
    assert {"synthetic_colour", "synthetic_shape", "synthetic_ocr", "synthetic_arithmetic"} <= set(tasks.TASKS)
    assert not tasks.get_task("synthetic_colour").needs_data and tasks.get_task("vqav2").needs_data
    with pytest.raises(ValueError, match="unknown eval task 'vqa3'.*vqav2"):
        tasks.get_task("vqa3")


def test_scores_follow_each_benchmarks_metric():
    vqa = Sample("1", "q", ("two",) * 3 + ("2",) * 3 + ("three",) * 4)
    assert tasks.get_task("vqav2").score("2", vqa) == pytest.approx(1.0)
    assert tasks.get_task("chartqa").score("10.4", Sample("1", "q", ("10",))) == 1.0  # within 5%
    assert tasks.get_task("docvqa").score("hello", Sample("1", "q", ("hallo",))) == pytest.approx(0.8)
    mc = Sample("1", "q", ("B",), options=("cat", "dog"))
    assert tasks.get_task("ai2d").score("B", mc) == 1.0 and tasks.get_task("ai2d").score("A", mc) == 0.0
    assert tasks.get_task("mathvista").score("3.0", Sample("1", "q", ("3",))) == 1.0
    assert tasks.get_task("synthetic_colour").score("Red.", Sample("1", "q", ("red",))) == 1.0
    math = Sample("1", "q", ("x^2 + 1",), category=tasks.OCRBENCH_HANDWRITTEN_MATH)
    assert tasks.get_task("ocrbench").score("It reads x^2+1", math) == 1.0
    assert tasks.get_task("ocrbench").scale == 1000.0


def test_jsonl_images_are_relative_to_the_file_and_answers_become_letters(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    path = _write_jsonl(tmp_path / "ai2d.jsonl", [
        {"id": 1, "image": "img/a.png", "question": "Which?", "options": ["egg", "larva"], "answer": "larva"},
        {"id": "2", "image": "img/a.png", "question": "Which?", "options": ["egg", "larva"], "answer": "a"},
    ])
    samples = tasks.load_jsonl(path, tasks.get_task("ai2d"))
    assert [s.id for s in samples] == ["1", "2"]
    assert samples[0].images == (str(tmp_path / "img" / "a.png"),)
    assert [s.answers for s in samples] == [("B",), ("A",)]
    assert len(tasks.load_jsonl(path, tasks.get_task("ai2d"), limit=1)) == 1


def test_bad_records_name_the_file_line_and_field(tmp_path):
    task = tasks.get_task("textvqa")
    cases = [
        ({"id": 1, "answers": ["a"]}, "missing field 'question'"),
        ({"id": 1, "question": "q"}, "needs 'answers'"),
        ({"id": 1, "question": "q", "answers": "a"}, "'answers' must be a non-empty list"),
        ({"id": 1, "question": "q", "answer": "a", "image": 3}, "'image' must be a path"),
    ]
    for record, message in cases:
        path = _write_jsonl(tmp_path / "bad.jsonl", [{"id": 0, "question": "q", "answer": "a"}, record])
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            tasks.load_jsonl(path, task)
    path = _write_jsonl(tmp_path / "dup.jsonl", [{"id": 5, "question": "q", "answer": "a"}] * 2)
    with pytest.raises(ValueError, match="dup.jsonl:2: id '5' already used on line 1"):
        tasks.load_jsonl(path, task)
    path = _write_jsonl(tmp_path / "mc.jsonl", [{"id": 1, "question": "q", "answer": "C", "options": ["x", "y"]}])
    with pytest.raises(ValueError, match="mc.jsonl:1: answer 'C' is neither an option letter"):
        tasks.load_jsonl(path, tasks.get_task("ai2d"))
    path = _write_jsonl(tmp_path / "nomc.jsonl", [{"id": 1, "question": "q", "answer": "A"}])
    with pytest.raises(ValueError, match="multiple choice but the sample has no 'options'"):
        tasks.load_jsonl(path, tasks.get_task("ai2d"))
    path = _write_jsonl(tmp_path / "img.jsonl", [{"id": 1, "question": "q", "answer": "a", "image": "missing.png"}])
    with pytest.raises(FileNotFoundError, match="sample '1': image .*missing.png does not exist"):
        tasks.load_jsonl(path, task)


def test_synthetic_tasks_draw_heldout_examples_without_a_data_file():
    task = tasks.get_task("synthetic_colour")
    samples = tasks.load_samples(task, limit=3, tile_size=28)
    assert [s.id for s in samples] == ["eval/0", "eval/1", "eval/2"]
    assert samples[0].question == "What colour is the shape?" and len(samples[0].images) == 1
    assert [s.answers for s in samples] == [s.answers for s in tasks.load_samples(task, limit=3, tile_size=28)]
    assert len(tasks.load_samples(task, tile_size=28)) == tasks.DEFAULT_SYNTHETIC_COUNT
    assert tasks.load_samples(tasks.get_task("synthetic_arithmetic"), limit=1)[0].images == ()
    with pytest.raises(ValueError, match="synthetic and takes no data file"):
        tasks.load_samples(task, "x.jsonl")
    with pytest.raises(ValueError, match="needs a data file"):
        tasks.load_samples(tasks.get_task("docvqa"))
