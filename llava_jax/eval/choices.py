"""Multiple-choice benchmarks: ScienceQA (eval_science_qa.py's rules), MMBench (circular), SEED-Bench."""

from __future__ import annotations

import re
from collections.abc import Sequence

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(text: str, num_choices: int) -> int:
    """eval_science_qa.py's reading of an answer: the index of its option letter, or -1.

    The letter is the whole answer ("B"), or its first character before ". " ("B. 12 cm"), or the one
    letter of a single "The answer is X." in it; a letter beyond the question's choices is -1."""
    if text in SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    if letter is not None and letter in SQA_OPTIONS[:num_choices]:
        return SQA_OPTIONS.index(letter)
    return -1


def mmbench_choice(text: str, options: Sequence[str]) -> int:
    """The option an MMBench answer picks (index into `options`, the options as the prompt listed
    them), or -1. A letter alone or leading the answer ("B", "B.", "(B) ...", "B: ...") picks it;
    otherwise the one option whose text the answer is (case-insensitive)."""
    letters = "ABCD"[: len(options)]
    text = text.strip()
    m = re.match(r"^\(?([A-D])\)?(?:$|[.):,\s])", text)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    plain = text.rstrip(".").strip().lower()
    hits = [i for i, option in enumerate(options) if str(option).strip().lower() == plain]
    return hits[0] if len(hits) == 1 else -1


def circular_correct(groups: dict[object, list[bool]]) -> float:
    """Percent of groups (a question and its circular copies) whose every pass is right."""
    return 100 * sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0
