"""Worked examples for each benchmark metric."""

import pytest

from nvlm_jax.eval import metrics as M


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("The Dog.", "dog"), ("a red-car", "red car"), ("dont know", "don't know"),
    ("  Yes!\n", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("an apple, please", "apple please"),
])
def test_vqa_normalisation(raw, normal):
    assert M.normalize_vqa_answer(raw) == normal


def test_vqa_accuracy_leave_one_out_average():
    humans = ["2"] * 3 + ["3"] * 7
    # Leaving out one of the three "2"s leaves 2 matches (2/3); leaving out a "3" leaves 3 (1.0).
    assert M.vqa_accuracy("Two", humans) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert M.vqa_accuracy("three", humans) == 1.0
    assert M.vqa_accuracy("four", humans) == 0.0
    assert M.vqa_accuracy("2", ["2"] + ["5"] * 9) == pytest.approx(0.9 * 1 / 3)


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3


def test_anls_threshold_and_best_answer():
    assert M.anls("Hello World", ["hello wrld"]) == pytest.approx(1 - 1 / 11)
    assert M.anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
    assert M.anls("june 5", ["5 june", "June 5"]) == 1.0
    assert M.anls("ab", ["abcd"]) == 0.0  # exactly 0.5 is not below the threshold


def test_relaxed_accuracy():
    assert M.relaxed_accuracy("10.4", "10") == 1.0
    assert M.relaxed_accuracy("10.6", "10") == 0.0
    assert M.relaxed_accuracy("50%", "0.5") == 1.0
    assert M.relaxed_accuracy("0", "0") == 1.0 and M.relaxed_accuracy("0.01", "0") == 0.0
    assert M.relaxed_accuracy("Yes", "yes") == 1.0


def test_exact_and_substring_match():
    assert M.exact_match("The cat", ["cat", "kitten"]) == 1.0
    assert M.exact_match("cats", "cat") == 0.0
    assert M.substring_match("The sign says STOP here", "stop") == 1.0
    assert M.substring_match("x ^ 2 + 1", "x^2+1", ignore_spaces=True) == 1.0
    assert M.substring_match("nothing", ["stop"]) == 0.0


@pytest.mark.parametrize("response, expected", [
    ("The answer is (B).", "B"), ("Answer: C", "C"), ("(D) because the angle is right", "D"),
    ("A. The triangle", "A"), ("B", "B"), ("It is a square.", "C"), ("I think (A) or (B)", None),
    ("no idea", None),
])
def test_extract_choice(response, expected):
    options = ["triangle", "circle", "square", "hexagon"]
    assert M.extract_choice(response, options) == expected


def test_multiple_choice_accuracy():
    assert M.multiple_choice_accuracy("answer is b", ["x", "y"], "B") == 1.0
    assert M.multiple_choice_accuracy("no idea", ["x", "y"], "A") == 0.0
