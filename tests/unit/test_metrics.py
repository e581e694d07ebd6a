"""Metrics on fixed tiny sets with answers worked out by hand."""

import math

import numpy as np
import pytest

from tasks import metrics


def test_fixed_set_values():
    y_true = [0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 0, 2, 2]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(5 / 7)
    cm = metrics.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert metrics.f1_per_class(y_true, y_pred, 3).tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert metrics.f1_macro(y_true, y_pred, 3) == pytest.approx((2 / 3 + 1 / 2 + 1.0) / 3)


def test_f1_macro_binary_pinned():
    # tp=3 fp=1 fn=2 for class 1 -> F1 = 6/9; class 0: tp=4 fp=2 fn=1 -> F1 = 8/11
    y_true = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(0.7)
    assert metrics.f1_macro(y_true, y_pred, 2) == pytest.approx((6 / 9 + 8 / 11) / 2)
    assert round(metrics.f1_macro(y_true, y_pred, 2), 6) == 0.69697


def test_perfect_and_all_wrong():
    assert metrics.accuracy([0, 1, 2], [0, 1, 2]) == 1.0
    assert metrics.f1_macro([0, 1, 2], [0, 1, 2], 3) == 1.0
    assert metrics.accuracy([0, 1], [1, 0]) == 0.0
    assert metrics.f1_macro([0, 1], [1, 0], 2) == 0.0


def test_absent_class_not_counted_in_macro_f1():
    # class 2 never occurs in truth or prediction: macro-F1 averages classes 0 and 1 only
    assert metrics.f1_macro([0, 1], [0, 1], 3) == 1.0
    # a class predicted but never true does count (its F1 is 0)
    assert metrics.f1_macro([0, 0], [0, 2], 3) == pytest.approx((2 / 3 + 0.0) / 2)


def test_constant_predictor():
    # always predicting class 0 on a balanced set: accuracy 0.5, F1 = (2/3 + 0) / 2
    assert metrics.accuracy([0, 1, 0, 1], [0, 0, 0, 0]) == 0.5
    assert metrics.f1_macro([0, 1, 0, 1], [0, 0, 0, 0], 2) == pytest.approx(1 / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="y_true has 2 items but y_pred has 1"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no items"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="outside 0..1"):
        metrics.confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="y_pred has class ids outside"):
        metrics.f1_macro([0, 1], [0, -1], 2)


def test_perplexity():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == math.inf
    assert math.isnan(metrics.perplexity(math.nan))
    assert isinstance(metrics.confusion_matrix([0], [0], 1), np.ndarray)


def test_the_metric_vocabulary_params_are_checked_against_is_what_tables_compute():
    from tasks import metrics

    assert set(metrics.METRIC_NAMES) == {*metrics.PREDICTORS, "f1_macro", "loss", "perplexity",
                                         *metrics.GENERATIVE, "length_ratio", *metrics.PREFERENCE}
