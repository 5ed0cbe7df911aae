"""`cpt.metrics`: accuracy and macro-F1, checked against sums worked out by hand."""

from __future__ import annotations

import pytest

from cpt.metrics import accuracy, macro_f1


def test_macro_f1_averages_each_labels_f1() -> None:
    truths = ["a", "a", "a", "b"]
    predictions = ["a", "a", "b", "b"]
    # a: precision 1, recall 2/3 -> 0.8; b: precision 1/2, recall 1 -> 2/3
    assert macro_f1(predictions, truths) == pytest.approx((0.8 + 2 / 3) / 2)
    assert accuracy(predictions, truths) == 0.75


def test_macro_f1_punishes_predicting_one_label() -> None:
    truths = ["a"] * 9 + ["b"]
    predictions = ["a"] * 10
    assert accuracy(predictions, truths) == 0.9
    assert macro_f1(predictions, truths, ["a", "b"]) == pytest.approx((18 / 19 + 0) / 2)
    assert macro_f1(predictions, truths, ["a", "b", "c"]) == pytest.approx((18 / 19 + 0) / 2)  # c: absent


def test_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        macro_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])




def test_perfect_predictions_score_one_and_all_wrong_zero() -> None:
    truths = ["a", "b", "c", "a"]
    assert accuracy(truths, truths) == 1.0
    assert macro_f1(truths, truths) == 1.0
    wrong = ["b", "c", "a", "b"]
    assert accuracy(wrong, truths) == 0.0
    assert macro_f1(wrong, truths) == 0.0


def test_a_label_predicted_but_never_true_counts_as_zero() -> None:
    truths = ["a", "a", "b", "b"]
    predictions = ["a", "c", "b", "b"]
    # a: 2 * 1 / (1 + 2) = 2/3; b: 2 * 2 / (2 + 2) = 1; c: 0 (predicted once, never true)
    assert macro_f1(predictions, truths) == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-12)
    # a label set that leaves c out averages a and b alone
    assert macro_f1(predictions, truths, ["a", "b"]) == pytest.approx((2 / 3 + 1) / 2, abs=1e-12)


def test_a_label_set_of_labels_never_seen_scores_zero() -> None:
    assert macro_f1(["a"], ["a"], ["x", "y"]) == 0.0


def test_metrics_take_any_sequence_and_do_not_depend_on_order() -> None:
    truths = ("a", "b", "b", "c")
    predictions = ("a", "b", "c", "c")
    swapped = [3, 1, 0, 2]
    assert accuracy(predictions, truths) == accuracy([predictions[i] for i in swapped], [truths[i] for i in swapped])
    assert macro_f1(predictions, truths) == pytest.approx(
        macro_f1([predictions[i] for i in swapped], [truths[i] for i in swapped]), abs=1e-12
    )


def test_macro_f1_refuses_what_accuracy_refuses() -> None:
    with pytest.raises(ValueError, match="1 predictions for 2 true labels"):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions to score"):
        macro_f1([], [])
