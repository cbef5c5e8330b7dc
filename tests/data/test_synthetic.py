"""Tests for nvlm_jax.data.synthetic: deterministic tasks with exact answers and disjoint splits."""

import numpy as np
import pytest
from scipy import ndimage

from nvlm_jax.data import synthetic
from nvlm_jax.processing import tiling


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_examples_are_a_pure_function_of_seed_and_index(task):
    a = synthetic.make_example(task, 7, seed=3)
    b = synthetic.make_example(task, 7, seed=3)
    assert (a.question, a.answer) == (b.question, b.answer)
    if a.image is not None:
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    others = [synthetic.make_example(task, i, seed=3) for i in range(8, 20)]
    assert any(o.question != a.question or o.answer != a.answer for o in others)


def test_different_seeds_give_different_datasets():
    a = [synthetic.make_example("arithmetic", i, seed=0).question for i in range(10)]
    b = [synthetic.make_example("arithmetic", i, seed=1).question for i in range(10)]
    assert a != b


def test_colour_and_shape_answers_are_one_word_from_small_class_sets():
    colours = {synthetic.make_example("colour", i).answer for i in range(200)}
    shapes = {synthetic.make_example("shape", i).answer for i in range(200)}
    assert colours == set(synthetic.COLOURS)
    assert shapes == set(synthetic.SHAPES)
    assert len(synthetic.COLOURS) == 6 and len(synthetic.SHAPES) == 4


def test_colour_images_show_the_answer_colour_at_28px():
    for i in range(40):
        ex = synthetic.make_example("colour", i, tile_size=28)
        pixels = np.asarray(ex.image).reshape(-1, 3).astype(int)
        assert ex.image.size == (28, 28)
        # The shape covers a big part of the image; its pixels are nearest to the answer colour.
        dist = {name: np.abs(pixels - rgb).sum(1) for name, rgb in synthetic.COLOURS.items()}
        nearest = np.argmin(np.stack(list(dist.values())), 0)
        saturated = pixels.max(1) - pixels.min(1) > 60
        votes = np.bincount(nearest[saturated], minlength=len(dist))
        assert list(dist)[int(votes.argmax())] == ex.answer
        assert saturated.mean() > 0.15


def test_shapes_are_distinguishable_by_their_filled_area():
    fills = {s: [] for s in synthetic.SHAPES}
    for i in range(300):
        ex = synthetic.make_example("shape", i, image_spec=synthetic.ImageSpec(112, 112))
        px = np.asarray(ex.image).astype(int)
        mask = px.max(2) - px.min(2) > 60
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills[ex.answer].append(mask.sum() / box)
    mean = {s: float(np.mean(v)) for s, v in fills.items()}
    # square ~1, circle ~pi/4, cross ~5/9, triangle ~1/2
    assert mean["square"] > mean["circle"] > mean["cross"] > mean["triangle"] - 0.02
    assert mean["square"] > 0.9 and mean["triangle"] < 0.6


def test_text_tasks_have_correct_answers():
    for i in range(50):
        ex = synthetic.make_example("arithmetic", i)
        a, op, b = ex.question.removeprefix("What is ").removesuffix("?").split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert ex.answer == str(expected) and expected >= 0 and ex.image is None
        rev = synthetic.make_example("word_reversal", i)
        words = rev.question.split(": ", 1)[1].split()
        assert rev.answer.split() == words[::-1]


def test_ocr_images_vary_in_aspect_and_force_multiple_tiles():
    grids = set()
    for i in range(60):
        ex = synthetic.make_example("ocr", i, tile_size=28)
        assert ex.answer and ex.question == "What is written in the image?"
        grids.add(tiling.select_grid(*ex.image.size, tile_size=28))
    assert any(c * r > 1 for c, r in grids)
    assert len({c / r for c, r in grids}) >= 3


def test_image_spec_sets_sizes_for_448px_tiles():
    spec = synthetic.ImageSpec(1344, 1344, (1.5,))
    ex = synthetic.make_example("ocr", 0, image_spec=spec)
    assert ex.image.size == (1344, 896)
    assert tiling.select_grid(1344, 896, tile_size=448) == (3, 2)


def test_chart_answers_match_the_drawn_bars():
    seen = set()
    for i in range(60):
        ex = synthetic.make_example("chart", i, image_spec=synthetic.ImageSpec(224, 224))
        seen.add(ex.question.split()[2])
        if ex.question == "How many bars are there?":
            assert ex.answer in {"3", "4", "5"}
        elif ex.question == "What colour is the tallest bar?":
            px = np.asarray(ex.image).astype(int)
            rgb = synthetic.COLOURS[ex.answer]
            rows = np.nonzero((np.abs(px - rgb).sum(2) < 30).any(1))[0]
            top = rows.min()
            # No other bar colour reaches as high.
            for name, other in synthetic.COLOURS.items():
                if name != ex.answer:
                    hits = np.nonzero((np.abs(px - other).sum(2) < 30).any(1))[0]
                    assert not hits.size or hits.min() > top
        else:
            assert ex.answer in {str(v) for v in range(1, 10)}
    assert len(seen) == 3  # all three question kinds occur


def test_counting_answers_count_the_shapes():
    for i in range(20):
        ex = synthetic.make_example("count", i, image_spec=synthetic.ImageSpec(168, 168))
        px = np.asarray(ex.image).astype(int)
        mask = px.max(2) - px.min(2) > 60
        _, n = ndimage.label(mask)
        assert str(n) == ex.answer


def test_heldout_split_is_a_disjoint_index_range():
    train = synthetic.split_indices("train", 1000)
    held = synthetic.split_indices("eval", 1000)
    test = synthetic.split_indices("test", 1000)
    assert set(train).isdisjoint(held) and set(held).isdisjoint(test)
    assert synthetic.split_indices("validation", 5) == synthetic.split_indices("eval", 5)
    with pytest.raises(ValueError, match="unknown synthetic split"):
        synthetic.split_indices("dev", 5)
    examples = synthetic.heldout_examples("colour", 3)
    assert [e.index for e in examples] == list(held[:3])


def test_data_source_yields_canonical_records():
    src = synthetic.SyntheticDataSource("shape", "eval", 5, seed=2)
    assert len(src) == 5
    label, record = src[1]
    assert label == f"synthetic:shape/eval#{synthetic.SPLIT_OFFSETS['eval'] + 1}"
    turns = record["conversations"]
    assert turns[0]["value"] == "<image>\nWhat shape is this?" and turns[1]["value"] in synthetic.SHAPES
    assert len(record["images"]) == 1
    text_label, text_record = synthetic.SyntheticDataSource("arithmetic", "train", 3)[0]
    assert text_record["images"] == [] and text_label.endswith("#0")


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown synthetic task 'colours'"):
        synthetic.make_example("colours", 0)
