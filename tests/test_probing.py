"""Sparse probing on synthetic pooled samples: a feature that is the label is found and is enough; noise is not."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.analysis.probing import (
    ProbeData,
    groups_of,
    key_document,
    mean_diff_ranking,
    one_vs_rest,
    probe_problem,
    window_keys,
)


def synthetic(n: int = 400, d: int = 50, label_feature: int = 17, seed: int = 0):
    """Sparse non-negative features; feature `label_feature` is active exactly on the positive samples."""
    rng = np.random.default_rng(seed)
    X = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < 0.3)
    y = rng.random(n) < 0.4
    X[:, label_feature] = np.where(y, 1.0 + rng.random(n), 0.0)
    return X, y


def test_k1_finds_the_label_feature_and_reaches_accuracy_1() -> None:
    X, y = synthetic()
    train, val = slice(0, 300), slice(300, None)
    result = probe_problem("p", X[train], X[val], y[train], y[val], [1, 5], C=1.0,
                           resid_train=X[train], resid_val=X[val])
    assert result.features[1] == [17]
    assert result.features[5][0] == 17 and len(result.features[5]) == 5
    assert result.accuracy[1] == 1.0 and result.accuracy[5] == 1.0
    assert result.residual == 1.0
    assert result.train == (int(y[train].sum()), int((~y[train]).sum()))


def test_shuffled_labels_give_chance() -> None:
    X, y = synthetic(n=4000, seed=1)
    y = np.random.default_rng(2).permutation(y)  # the control: labels unrelated to any feature
    result = probe_problem("p", X[:2000], X[2000:], y[:2000], y[2000:], [1, 5, 20], C=1.0)
    for k, accuracy in result.accuracy.items():
        assert accuracy == pytest.approx(0.5, abs=0.05), k


def test_ranking_is_by_absolute_mean_difference_ties_by_id() -> None:
    X = np.array([[0.0, 1.0, 5.0, 0.0], [0.0, 1.0, 5.0, 0.0], [2.0, 0.0, 5.0, 2.0], [2.0, 0.0, 5.0, 2.0]])
    y = np.array([1, 1, 0, 0])
    assert mean_diff_ranking(X, y).tolist() == [0, 3, 1, 2]  # |diff| 2, 2, 1, 0: a feature absent in the class counts


def test_one_vs_rest_within_subject_skips_problems_a_split_cannot_score() -> None:
    X = np.random.default_rng(0).random((12, 6)) * 0.1
    subject = np.array(["phys"] * 6 + ["chem"] * 6)
    chapter = np.array(["p1", "p1", "p2", "p2", "p1", "p2", "c1", "c1", "c1", "c2", "c2", "c1"])
    held_out = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1], bool)  # chem's held-out has both c1 and c2
    X[:, 0] = (chapter == "p1") | (chapter == "c1")
    data = ProbeData(X, None, held_out, {"subject": subject, "chapter": chapter})
    result = one_vs_rest(data, "chapter", within="subject", ks=[1], C=1.0)
    assert [p.name for p in result.problems] == ["c1", "c2", "p1", "p2"]
    assert result.skipped == []
    assert result.mean(1) == 1.0 and result.mean(None) is None
    held_out[10] = False  # now chem's held-out samples are all c1: both chem problems cannot be scored
    result = one_vs_rest(data, "chapter", within="subject", ks=[1], C=1.0)
    assert result.skipped == ["c1", "c2"] and [p.name for p in result.problems] == ["p1", "p2"]


def test_window_keys_group_rows_by_document_and_window() -> None:
    doc = np.array([0, 0, 0, 3, 3])
    position = np.array([1, 127, 128, 5, 300])
    keys = window_keys(doc, position, 128)
    samples = np.unique(keys)
    assert len(samples) == 4 and key_document(samples).tolist() == [0, 0, 3, 3]
    assert groups_of(keys, samples).tolist() == [0, 0, 1, 2, 3]
    assert groups_of(window_keys(np.array([1]), np.array([0]), 128), samples).tolist() == [-1]
    assert len(np.unique(window_keys(doc, position, None))) == 2  # whole documents
