"""VQA accuracy with EvalAI's answer normalisation (VQAv2, VizWiz, TextVQA).

An answer is normalised as EvalAI and the original LLaVA's `m4c_evaluator` do it, quirks included:
punctuation is dropped when it touches a space or when the text has a comma between digits, and
replaced by a space otherwise; a period not followed by a digit is dropped (at most 32 of them, as
the reference passes `re.UNICODE` where `re.sub` takes its count); number words become digits;
articles go; contractions written without apostrophes get them back.

The score of a prediction against ten human answers is the mean over the ten leave-one-out subsets
of min(1, matches among the other nine / 3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llava_jax.eval.vqa_tables import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's pattern: a period not followed by a digit
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_MAX_PERIODS = 32


def normalize_answer(text: str) -> str:
    """The answer as EvalAI compares it ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space or has_digit_comma else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """{normalised answer: its VQA score} for the distinct human answers (usually ten of them)."""
    answers = [normalize_answer(a) for a in human_answers]
    if not answers:
        return {}
    scores = {}
    for candidate in set(answers):
        total = 0.0
        for left_out in range(len(answers)):
            matches = sum(1 for j, a in enumerate(answers) if j != left_out and a == candidate)
            total += min(1.0, matches / 3)
        scores[candidate] = total / len(answers)
    return scores


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA score in [0, 1] of one predicted answer against the human answers."""
    return answer_scores(human_answers).get(normalize_answer(prediction), 0.0)
