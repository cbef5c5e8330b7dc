"""Benchmark metrics, each following its benchmark's official scoring rule.

- `vqa_accuracy`: VQAv2 / TextVQA. Answers are normalised (case, punctuation, number words,
  articles, common contractions); the score is the mean over the 10 leave-one-out subsets of
  min(#matching human answers / 3, 1).
- `anls`: DocVQA / InfographicVQA average normalised Levenshtein similarity (threshold 0.5).
- `relaxed_accuracy`: ChartQA, numbers within 5% relative error, otherwise exact match.
- `exact_match` (normalised), `substring_match` (OCRBench style).
- `extract_choice` / `multiple_choice_accuracy`: MMMU, AI2D, MathVista multiple choice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# ---- VQA normalisation ----------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings people type, mapped to the canonical contraction.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "ive": "i've", "lets": "let's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's",
    "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "wouldve": "would've", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # Punctuation touching a space (or a thousands comma) disappears; inside a word it splits.
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _strip_punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10)."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in human_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


# ---- ANLS -------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity to the closest answer; 0 when the distance ≥ threshold."""
    if not answers:
        raise ValueError("anls needs at least one answer")
    pred = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        gt = _anls_normalize(answer)
        longest = max(len(pred), len(gt))
        distance = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# ---- ChartQA relaxed accuracy -----------------------------------------------------------------


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """1.0 when both parse as numbers within `tolerance` relative error (exact when the answer
    is 0), or when the strings match case-insensitively; else 0.0."""
    pred, gt = _to_float(prediction), _to_float(answer)
    if pred is not None and gt is not None:
        if gt == 0:
            return float(pred == 0)
        return float(abs(pred - gt) / abs(gt) <= tolerance)
    return float(prediction.strip().lower() == answer.strip().lower())


# ---- exact and substring match ----------------------------------------------------------------


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if the VQA-normalised prediction equals any normalised answer."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in answers))


def substring_match(prediction: str, answers: Sequence[str] | str, ignore_spaces: bool = False) -> float:
    """OCRBench rule: 1.0 if any answer (lower-cased, stripped) occurs in the prediction;
    `ignore_spaces` removes all spaces first (its handwritten-math subset)."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = prediction.lower().strip()
    if ignore_spaces:
        pred = pred.replace(" ", "")
    for answer in answers:
        gt = answer.lower().strip()
        if ignore_spaces:
            gt = gt.replace(" ", "")
        if gt and gt in pred:
            return 1.0
    return 0.0


# ---- multiple choice ----------------------------------------------------------------------------


def extract_choice(response: str, options: Sequence[str], letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter a free-form response picks, or None.

    Tried in order: an explicit "answer is (X)" / "Answer: X", a bracketed "(X)", a letter
    followed by "." / ":" / ")" at a word start, a lone letter, then the text of exactly one
    option appearing in the response. Several different letters at the same level → None.
    """
    valid = letters[: len(options)]
    text = response.strip()
    patterns = [
        rf"answer(?: is|:)?\s*\(?([{valid}])\)?(?![A-Za-z])",
        rf"\(([{valid}])\)",
        rf"(?:^|\s)([{valid}])[.:)](?:\s|$)",
        rf"^([{valid}])$",
    ]
    for pattern in patterns:
        found = set(re.findall(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0))
        found = {f.upper() for f in found}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    lowered = text.lower()
    hits = [valid[i] for i, option in enumerate(options) if option and option.strip().lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def multiple_choice_accuracy(response: str, options: Sequence[str], answer_letter: str) -> float:
    """1.0 when `extract_choice` picks the answer letter; no pick counts as wrong."""
    return float(extract_choice(response, options) == answer_letter.upper())
