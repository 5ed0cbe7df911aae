"""Scores of a classifier's predictions against the true labels: accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of predictions equal to the true label.

    Raises:
        ValueError: if the lengths differ or there are none.
    """
    _check(predictions, truths)
    return sum(p == t for p, t in zip(predictions, truths, strict=True)) / len(truths)


def macro_f1(predictions: Sequence[str], truths: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """The unweighted mean over labels of each label's F1 (harmonic mean of precision and recall).

    A label that is neither predicted nor true anywhere is left out of the mean; one that is
    predicted but never right, or true but never found, counts with F1 = 0. A classifier that
    predicts one label for everything thus scores at most ``1 / L`` times that label's F1, where
    accuracy can still look good on unbalanced data.

    Args:
        predictions: the predicted labels.
        truths: the true labels, as many.
        labels: the label set (default: every label seen in either list).

    Raises:
        ValueError: if the lengths differ or there are none.
    """
    _check(predictions, truths)
    labels = list(dict.fromkeys([*truths, *predictions])) if labels is None else list(labels)
    scores = []
    for label in labels:
        true_positive = sum(p == label and t == label for p, t in zip(predictions, truths, strict=True))
        predicted = sum(p == label for p in predictions)
        actual = sum(t == label for t in truths)
        if predicted == 0 and actual == 0:
            continue
        scores.append(2 * true_positive / (predicted + actual))
    return sum(scores) / len(scores) if scores else 0.0


def _check(predictions: Sequence[str], truths: Sequence[str]) -> None:
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} true labels")
    if not truths:
        raise ValueError("no predictions to score")
