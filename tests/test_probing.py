"""Sparse probing on synthetic pooled samples: a feature that is the label is found and is enough; noise is not."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.analysis.probing import (
    ProbeData,
    balanced_accuracy,
    groups_of,
    key_document,
    mean_diff_ranking,
    one_vs_rest,
    probe_metrics,
    probe_problem,
    probe_tasks,
    resample_documents,
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
    data = ProbeData(X, None, held_out, np.arange(12), {"subject": subject, "chapter": chapter})
    result = one_vs_rest(data, "chapter", within="subject", ks=[1], C=1.0)
    assert [p.name for p in result.problems] == ["c1", "c2", "p1", "p2"]
    assert result.skipped == [] and result.reason is None
    assert result.mean(1) == 1.0 and result.mean(None) is None
    held_out[10] = False  # now chem's held-out samples are all c1: both chem problems cannot be scored
    result = one_vs_rest(data, "chapter", within="subject", ks=[1], C=1.0)
    why = dict(result.skipped)
    assert list(why) == ["c1", "c2"] and [p.name for p in result.problems] == ["p1", "p2"]
    assert why["c1"].startswith("no held-out sample of another chapter of chem (")
    assert why["c2"].startswith("no held-out sample of this chapter (")
    assert "1 vs 0 held-out samples" in why["c1"] and result.reason is None
    held_out[4:6] = False  # nor any held-out sample left: no problem at all, and the task says why
    result = one_vs_rest(data, "chapter", within="subject", ks=[1], C=1.0)
    assert not result.problems and len(result.skipped) == 4
    assert result.reason.startswith("no chapter has training and held-out samples of both classes: 4 problems")


def test_a_one_subject_corpus_says_why_the_subject_task_has_no_figure() -> None:
    rng = np.random.default_rng(0)
    chapter = np.array(["ch1", "ch2"] * 10)
    X = rng.random((20, 4)) * 0.1
    X[:, 2] = chapter == "ch1"
    data = ProbeData(X, None, np.arange(20) >= 12, np.arange(20) // 2,
                     {"subject": np.array(["physics"] * 20), "chapter": chapter})
    subject, chapters = probe_tasks(data, [1], C=1.0, seed=0)
    assert not subject.problems and subject.reason == "the corpus has one subject only (physics)"
    assert subject.skipped == [("physics", "the only subject in the corpus: nothing to tell it apart from")]
    assert chapters.reason is None and len(chapters.problems) == 2
    metrics = probe_metrics(data, [subject, chapters], [1], window=None, docs=(6, 4))
    assert metrics["subject_skipped"] == subject.reason and metrics["subject_k1"] is None
    assert metrics["subject_k1_lo"] is None and metrics["subject_problems"] == 0
    assert metrics["chapter_skipped"] is None and metrics["chapter_k1"] == 1.0
    assert metrics["chapter_k1_lo"] == metrics["chapter_k1_hi"] == 1.0  # perfect predictions: [1, 1]
    one_chapter = ProbeData(X, None, data.held_out, data.documents,
                            {"subject": data.labels["subject"], "chapter": np.array(["ch1"] * 20)})
    assert probe_tasks(one_chapter, [1], C=1.0, seed=0)[1].reason == "every subject has one chapter only"


def documents_of(n_docs: int, held: int, windows: int = 4, seed: int = 0) -> ProbeData:
    """Two subjects in turn, `windows` samples per document; feature 0 tells them apart, but one document in
    four of each subject sits on the other's side (a probe is right on 3 documents in 4, held out few or many);
    the first `held` documents held out."""
    rng = np.random.default_rng(seed)
    label = np.arange(n_docs) % 2 == 1
    wrong = np.arange(n_docs) // 2 % 4 == 0
    doc = np.repeat(np.arange(n_docs), windows)
    X = rng.normal(0, 0.2, (len(doc), 5))
    X[:, 0] += np.where(label ^ wrong, 1.0, -1.0)[doc]
    subject = np.where(label[doc], "physics", "chemistry").astype(object)
    return ProbeData(X, None, doc < held, doc, {"subject": subject, "chapter": subject})


def subject_interval(data: ProbeData, seed: int = 0) -> tuple[float, float, tuple[float, float]]:
    task = one_vs_rest(data, "subject", None, [1], C=1.0, resamples=resample_documents(
        data.documents, data.held_out, 1000, seed))
    return task.mean(1), task.problems[0].accuracy[1], task.interval(1)


def test_bootstrap_intervals_bracket_the_accuracy_and_shrink_with_more_held_out_documents() -> None:
    few, many = documents_of(400, held=8), documents_of(400, held=160)
    widths = []
    for data in (few, many):
        mean, accuracy, (lo, hi) = subject_interval(data)
        assert lo <= accuracy <= hi and lo <= mean <= hi and lo < hi
        assert accuracy == 0.75  # 3 documents in 4 right, whatever the split's size
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 20 times the documents: roughly sqrt(20) times narrower


def test_bootstrap_is_reproducible_with_the_seed_and_resamples_whole_documents() -> None:
    data = documents_of(200, held=20)
    assert subject_interval(data, seed=3) == subject_interval(data, seed=3)
    assert subject_interval(data, seed=3)[2] != subject_interval(data, seed=4)[2]
    drawn = resample_documents(data.documents, data.held_out, 50, seed=0)
    assert drawn.counts.shape == (50, 20) and (drawn.counts.sum(1) == 20).all()  # n documents drawn, n held out
    assert (drawn.column[~data.held_out] == -1).all() and drawn.column[data.held_out].tolist() == \
        np.repeat(np.arange(20), 4).tolist()  # a document's windows share its draws


def test_resampled_balanced_accuracy_weights_samples_by_their_documents_draws() -> None:
    y, predicted, column = np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool), np.array([0, 1, 2, 2])
    counts = np.array([[1, 1, 1], [2, 0, 1], [0, 1, 3], [1, 1, 0]], float)
    result = balanced_accuracy(y, predicted, column, counts)
    assert result[:3].tolist() == [0.75, 1.0, 0.5] and np.isnan(result[3])  # the last lacks a negative sample


def test_point_accuracy_is_sklearns_balanced_accuracy() -> None:
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(5)
    y, predicted = rng.random(50) < 0.3, rng.random(50) < 0.5
    ours = balanced_accuracy(y, predicted, np.arange(50), np.ones((1, 50)))[0]
    assert ours == pytest.approx(balanced_accuracy_score(y, predicted), abs=1e-15)


def test_window_keys_group_rows_by_document_and_window() -> None:
    doc = np.array([0, 0, 0, 3, 3])
    position = np.array([1, 127, 128, 5, 300])
    keys = window_keys(doc, position, 128)
    samples = np.unique(keys)
    assert len(samples) == 4 and key_document(samples).tolist() == [0, 0, 3, 3]
    assert groups_of(keys, samples).tolist() == [0, 0, 1, 2, 3]
    assert groups_of(window_keys(np.array([1]), np.array([0]), 128), samples).tolist() == [-1]
    assert len(np.unique(window_keys(doc, position, None))) == 2  # whole documents
