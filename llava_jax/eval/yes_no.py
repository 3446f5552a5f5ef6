"""Yes/no benchmarks: POPE (eval_pope.py's rules) and MME (its eval_tool/calculation.py's rules)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def pope_label(text: str) -> str:
    """eval_pope.py's reading of an answer: its first sentence (up to the first period), commas
    removed, is "no" when one of its space-separated words is "No", "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """accuracy, precision, recall, f1 (of "yes" as the positive class) and yes_ratio, as fractions.
    predictions: answer texts; labels: "yes" / "no" (anything but "no" counts as yes, as eval_pope.py)."""
    pred = [pope_label(p) == "yes" for p in predictions]
    gold = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred), "count": len(pred)}  # fmt: skip


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(text: str) -> str:
    """calculation.py's reading: "yes"/"no" when the lowercased answer is exactly that, else the one
    found in its first four characters ("yes" first), else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Sequence[tuple[str, str, str, str]]) -> dict:
    """MME's scores from (category, image file, ground truth, answer text) rows.

    Per category: acc (percent of questions right) and acc+ (percent of images with both questions
    right); its score is acc + acc+. perception / cognition: the sums of their categories' scores.
    """
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, truth, text in rows:
        by_category[category][image].append(mme_label(text) == truth.lower())
    categories = {}
    for category, images in by_category.items():
        right = [r for per_image in images.values() for r in per_image]
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(all(per_image) for per_image in images.values()) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(v["score"] for k, v in categories.items() if k in MME_PERCEPTION),
        "cognition": sum(v["score"] for k, v in categories.items() if k in MME_COGNITION),
        "categories": categories,
    }
