"""Sparse probing (SAEBench-style): can k SAE features tell the corpus's labels apart?

Samples are mean-pooled windows of documents (`window` tokens; or whole documents): a sample's vector is
the mean, over its tokens, of each feature's activation (0 where it does not fire), or of the raw residual
activation for the ceiling. Splits stay by document: training samples come from the token cache's
training documents, held-out samples from its validation documents.

Each task is a set of binary one-vs-rest problems, as SAEBench builds them: `subject` (each subject against
the others) and `chapter` (within each subject, each chapter against the subject's other chapters). For one
problem and each k: rank the features by |mean over positive training samples - mean over negative ones|
(ties by id), keep the top k, standardise them and fit scikit-learn's LogisticRegression (L2, C, balanced
class weights) on the training samples only, then report the balanced accuracy on the held-out samples
(mean of the true-positive and true-negative rates: 0.5 is chance whatever the class sizes). The ceiling is
the same probe on all d_in dimensions of the pooled residual. A problem is scored only when both splits
hold both classes; a task's figure is the mean over its scored problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PROCEDURE = (
    "Samples: each document cut into windows of `window` tokens (null: whole documents), each mean-pooled "
    "(SAE features: mean activation, 0 where a feature does not fire; residual: mean activation vector); "
    "train samples from the token cache's training documents, held-out samples from its validation documents. "
    "Tasks as one-vs-rest binary problems: subject (each subject vs the others), chapter (each chapter vs the "
    "other chapters of its subject). Per problem and k: the k features with the largest |class-mean "
    "difference| on the training samples, standardised, scikit-learn LogisticRegression (L2, C=probe_c, "
    "class_weight=balanced) fitted on training samples; figure: balanced accuracy on the held-out samples "
    "(0.5 = chance), averaged over the problems where both splits hold both classes. resid: the same probe on "
    "all d_in dimensions of the pooled residual (the ceiling). After SAEBench's sparse probing (Karvonen et "
    "al., 2025) and Gurnee et al. (2023)."
)


def mean_diff_ranking(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices by |mean over y=1 rows - mean over y=0 rows|, largest first (ties by index)."""
    y = np.asarray(y, dtype=bool)
    diff = np.abs(X[y].mean(0) - X[~y].mean(0))
    return np.lexsort((np.arange(X.shape[1]), -diff))


def probe_accuracy(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                   C: float) -> float:
    """Balanced held-out accuracy of a standardised L2 logistic-regression probe fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))
    probe.fit(X_train, y_train)
    return float(balanced_accuracy_score(y_val, probe.predict(X_val)))


@dataclass(frozen=True)
class ProblemResult:
    """One binary problem: accuracy per k with the features chosen, and the residual ceiling."""

    name: str
    train: tuple[int, int]
    """(positive, negative) training samples."""
    validation: tuple[int, int]
    accuracy: dict[int, float]
    features: dict[int, list[int]]
    residual: float | None


def probe_problem(name: str, sae_train: np.ndarray, sae_val: np.ndarray, y_train: np.ndarray, y_val: np.ndarray,
                  ks: Sequence[int], C: float, resid_train: np.ndarray | None = None,
                  resid_val: np.ndarray | None = None) -> ProblemResult:
    ranking = mean_diff_ranking(sae_train, y_train)
    accuracy, features = {}, {}
    for k in ks:
        chosen = np.sort(ranking[:k])
        accuracy[k] = probe_accuracy(sae_train[:, chosen], y_train, sae_val[:, chosen], y_val, C)
        features[k] = ranking[:k].tolist()
    residual = None
    if resid_train is not None and resid_val is not None:
        residual = probe_accuracy(resid_train, y_train, resid_val, y_val, C)
    return ProblemResult(name, _class_counts(y_train), _class_counts(y_val), accuracy, features, residual)


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    positive = int(np.sum(y))
    return positive, len(y) - positive


@dataclass
class TaskResult:
    name: str
    problems: list[ProblemResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Problems left out because a split lacks one of the classes."""

    def mean(self, k: int | None) -> float | None:
        """Mean accuracy over the scored problems at k (None: the residual ceiling)."""
        values = [p.residual if k is None else p.accuracy[k] for p in self.problems]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class ProbeData:
    """Pooled samples: SAE features [n, d_sae], residual [n, d_in] (or None), split (1: held out), labels."""

    sae: np.ndarray
    residual: np.ndarray | None
    held_out: np.ndarray
    labels: dict[str, np.ndarray]
    """Per label name (subject, chapter), one string per sample."""


def one_vs_rest(data: ProbeData, task: str, within: str | None, ks: Sequence[int], C: float) -> TaskResult:
    """Every class of `data.labels[task]` against the rest, within each value of `within` (None: all samples)."""
    result = TaskResult(task)
    labels = data.labels[task]
    scopes = [None] if within is None else sorted(set(data.labels[within].tolist()))
    for scope in scopes:
        in_scope = np.ones(len(labels), bool) if scope is None else data.labels[within] == scope
        for cls in sorted(set(labels[in_scope].tolist())):
            y = labels == cls
            train, val = in_scope & ~data.held_out, in_scope & data.held_out
            if len(set(y[train].tolist())) < 2 or len(set(y[val].tolist())) < 2:
                result.skipped.append(cls)
                continue
            resid = data.residual
            result.problems.append(probe_problem(
                cls, data.sae[train], data.sae[val], y[train], y[val], ks, C,
                None if resid is None else resid[train], None if resid is None else resid[val]))
    return result


def window_keys(doc: np.ndarray, position: np.ndarray, window: int | None) -> np.ndarray:
    """One int64 key per row naming its sample: (document, position // window), or the document alone."""
    index = np.zeros(len(doc), np.int64) if window is None else np.asarray(position, np.int64) // window
    return (np.asarray(doc, np.int64) << 32) | index


def key_document(keys: np.ndarray) -> np.ndarray:
    return (keys >> 32).astype(np.int64)


def groups_of(keys: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Each row's sample index in the sorted `samples` keys, -1 for rows whose key is not among them."""
    if not len(samples):
        return np.full(len(keys), -1, np.int64)
    at = np.searchsorted(samples, keys).clip(max=len(samples) - 1)
    return np.where(samples[at] == keys, at, -1)


def pool_residual(cache, samples: np.ndarray, window: int | None, batch_rows: int = 8192) -> np.ndarray:
    """Mean raw activation per sample (float64 [n_samples, d_in]) from an ActivationCache, outliers left out."""
    import scipy.sparse

    sums = np.zeros((len(samples), cache.d_model), np.float64)
    sizes = np.zeros(len(samples), np.int64)
    for split in ("train", "validation"):
        if cache.n_rows(split) == 0:
            continue
        keys = window_keys(cache.column(split, "doc_ids"), cache.column(split, "positions"), window)
        for rows, index in cache.iter_batches(split, batch_rows):
            group = groups_of(keys[index], samples)
            keep = np.flatnonzero(group >= 0)
            member = scipy.sparse.csr_matrix((np.ones(len(keep)), (group[keep], keep)),
                                             shape=(len(samples), len(index)))
            sums += member @ rows.double().numpy()
            sizes += np.bincount(group[keep], minlength=len(samples))
    return sums / np.maximum(sizes, 1)[:, None]


TASKS = (("subject", None), ("chapter", "subject"))
"""(label, within): chapters are told apart only among the chapters of one subject."""


def pooled_samples(db, cache, doc_split: np.ndarray, labels: list[dict[str, str]], window: int | None) -> ProbeData:
    """The probe samples of an activation DB and its activation cache: every window of every document the DB
    holds, outlier rows left out of both pools."""
    keys = window_keys(db.row_doc, db.row_position, window)
    keep = ~db.row_outlier
    samples = np.unique(keys[keep])
    group = np.where(keep, groups_of(keys, samples), -1)
    docs = key_document(samples)
    return ProbeData(sae=db.pool_rows(group, len(samples)), residual=pool_residual(cache, samples, window),
                     held_out=np.asarray(doc_split)[docs] == 1,
                     labels={name: np.array([labels[d][name] for d in docs.tolist()], dtype=object)
                             for name, _ in TASKS})


def probe_tasks(data: ProbeData, ks: Sequence[int], C: float) -> list[TaskResult]:
    return [one_vs_rest(data, name, within, ks, C) for name, within in TASKS]


def probe_metrics(data: ProbeData, tasks: list[TaskResult], ks: Sequence[int], window: int | None,
                  docs: tuple[int, int]) -> dict[str, object]:
    """probing.json: flat short keys (`subject_k1`, ..., `subject_resid`, `chapter_k5`, ...) and sample sizes."""
    metrics: dict[str, object] = {}
    for task in tasks:
        for k in ks:
            value = task.mean(k)
            metrics[f"{task.name}_k{k}"] = None if value is None else round(value, 4)
        resid = task.mean(None)
        metrics[f"{task.name}_resid"] = None if resid is None else round(resid, 4)
        metrics[f"{task.name}_problems"] = len(task.problems)
    metrics.update(train_samples=int((~data.held_out).sum()), val_samples=int(data.held_out.sum()),
                   train_docs=docs[0], val_docs=docs[1], window=window, procedure=PROCEDURE)
    return metrics
