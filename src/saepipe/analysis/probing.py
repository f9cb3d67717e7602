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
hold both classes (otherwise it is left out with the reason); a task's figure is the mean over its scored
problems.

Intervals: the held-out samples come from few documents, and the windows of one document are not independent
samples, so each accuracy gets a 95 % percentile interval from a bootstrap over the held-out documents: draw
them with replacement, weight each held-out sample by how often its document was drawn, and recompute the
balanced accuracy from the probes' fixed predictions (no refit) and the task mean over the problems the
resample can score. Small held-out splits thus read as wide intervals; but a class held out in one document
keeps its rate in every resample, so its problem's interval understates the uncertainty (probing_features.json
gives each problem's held-out documents per class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from saepipe.paths import PROBING_FEATURES

RESAMPLES = 1000
"""Bootstrap resamples of the held-out documents behind each interval."""
LEVEL = 0.95

PROCEDURE = (
    "Samples: each document cut into windows of `window` tokens (null: whole documents), each mean-pooled "
    "(SAE features: mean activation, 0 where a feature does not fire; residual: mean activation vector); "
    "train samples from the token cache's training documents, held-out samples from its validation documents. "
    "Tasks as one-vs-rest binary problems: subject (each subject vs the others), chapter (each chapter vs the "
    "other chapters of its subject). Per problem and k: the k features with the largest |class-mean "
    "difference| on the training samples, standardised, scikit-learn LogisticRegression (L2, C=probe_c, "
    "class_weight=balanced) fitted on training samples; figure: balanced accuracy on the held-out samples "
    "(0.5 = chance), averaged over the problems where both splits hold both classes (the others are left out, "
    "each with its reason; <task>_skipped says why a task has no figure). resid: the same probe on all d_in "
    f"dimensions of the pooled residual (the ceiling). _lo/_hi: {LEVEL:.0%} percentile interval from a bootstrap "
    f"over the held-out documents ({RESAMPLES} resamples seeded with interp.seed; each draws the held-out "
    "documents with replacement, weights each held-out sample by its document's draws and recomputes the "
    "balanced accuracies from the probes' fixed predictions, no refit, and the task mean over the problems "
    "the resample holds both classes of; a class held out in one document keeps its rate in every resample, "
    "so such intervals are too narrow). After SAEBench's sparse probing (Karvonen et al., 2025) and Gurnee "
    "et al. (2023)."
)


def mean_diff_ranking(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices by |mean over y=1 rows - mean over y=0 rows|, largest first (ties by index)."""
    y = np.asarray(y, dtype=bool)
    diff = np.abs(X[y].mean(0) - X[~y].mean(0))
    return np.lexsort((np.arange(X.shape[1]), -diff))


def fit_predict(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, C: float) -> np.ndarray:
    """Held-out predictions (bool) of a standardised L2 logistic-regression probe fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))
    probe.fit(X_train, np.asarray(y_train, bool))
    return np.asarray(probe.predict(X_val), bool)


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray, column: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean of the true-positive and true-negative rates) in each resample, nan where a
    resample holds no sample of a class. Sample i belongs to document column[i]; counts[r, d] is how often
    resample r drew document d (one row of ones: the held-out split itself)."""
    y, predicted = np.asarray(y, bool), np.asarray(predicted, bool)

    def drawn(mask: np.ndarray) -> np.ndarray:
        return counts @ np.bincount(column, weights=mask, minlength=counts.shape[1])

    positive, negative = drawn(y), drawn(~y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (drawn(y & predicted) / positive + drawn(~y & ~predicted) / negative) / 2


def percentile_interval(values: np.ndarray | None) -> tuple[float, float] | None:
    """The central LEVEL interval of the resampled values that are defined (None: none is)."""
    if values is None:
        return None
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Resamples:
    """A bootstrap over held-out documents: counts[r, d] is how often resample r drew document d; column[i]
    is sample i's document d (-1 for samples outside the held-out split)."""

    counts: np.ndarray
    column: np.ndarray

    def of(self, rows: np.ndarray) -> Resamples:
        return Resamples(self.counts, self.column[rows])


def resample_documents(documents: np.ndarray, held_out: np.ndarray, n: int, seed: int) -> Resamples:
    """Draw the held-out documents with replacement, as many as there are, n times (seeded)."""
    names, column = np.unique(np.asarray(documents)[held_out], return_inverse=True)
    full = np.full(len(held_out), -1, np.int64)
    full[held_out] = column
    if not len(names):
        return Resamples(np.zeros((n, 0)), full)
    counts = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), size=n)
    return Resamples(counts.astype(np.float64), full)


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
    resampled: dict[int | None, np.ndarray] = field(default_factory=dict)
    """Per k (None: the residual), the balanced accuracy in each bootstrap resample (nan: the resample lacks
    a class); empty without a bootstrap."""
    documents: tuple[int, int] | None = None
    """(positive, negative) held-out documents, the bootstrap's units: a class held out in one document only
    keeps its true-positive (or true-negative) rate in every resample."""

    def interval(self, k: int | None) -> tuple[float, float] | None:
        """The bootstrap interval of the accuracy at k (None: the residual ceiling)."""
        return percentile_interval(self.resampled.get(k))


def probe_problem(name: str, sae_train: np.ndarray, sae_val: np.ndarray, y_train: np.ndarray, y_val: np.ndarray,
                  ks: Sequence[int], C: float, resid_train: np.ndarray | None = None,
                  resid_val: np.ndarray | None = None, resamples: Resamples | None = None) -> ProblemResult:
    """Fit the probes of one problem; with `resamples` (over the held-out rows), their bootstrap accuracies too."""
    y_train, y_val = np.asarray(y_train, bool), np.asarray(y_val, bool)
    ranking = mean_diff_ranking(sae_train, y_train)
    predictions: dict[int | None, np.ndarray] = {}
    for k in ks:
        chosen = np.sort(ranking[:k])
        predictions[k] = fit_predict(sae_train[:, chosen], y_train, sae_val[:, chosen], C)
    if resid_train is not None and resid_val is not None:
        predictions[None] = fit_predict(resid_train, y_train, resid_val, C)
    itself = np.arange(len(y_val))
    score = {k: float(balanced_accuracy(y_val, p, itself, np.ones((1, len(y_val))))[0])
             for k, p in predictions.items()}
    resampled = {} if resamples is None else {
        k: balanced_accuracy(y_val, p, resamples.column, resamples.counts) for k, p in predictions.items()}
    documents = None if resamples is None else (len(np.unique(resamples.column[y_val])),
                                                len(np.unique(resamples.column[~y_val])))
    return ProblemResult(name, _class_counts(y_train), _class_counts(y_val), {k: score[k] for k in ks},
                         {k: ranking[:k].tolist() for k in ks}, score.get(None), resampled, documents)


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    positive = int(np.sum(y))
    return positive, len(y) - positive


@dataclass
class TaskResult:
    name: str
    problems: list[ProblemResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Problems left out, each (class, why): a split lacks one of the classes, or the class is alone."""
    reason: str | None = None
    """Why no problem was scored (None: some were)."""

    def mean(self, k: int | None) -> float | None:
        """Mean accuracy over the scored problems at k (None: the residual ceiling)."""
        values = [p.residual if k is None else p.accuracy[k] for p in self.problems]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def interval(self, k: int | None) -> tuple[float, float] | None:
        """Bootstrap interval of the mean at k: in each resample, the mean over the problems it can score."""
        runs = [p.resampled[k] for p in self.problems if k in p.resampled]
        if not runs:
            return None
        stacked = np.stack(runs)
        scored = ~np.isnan(stacked)
        n = scored.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(scored, stacked, 0.0).sum(0) / n
        return percentile_interval(means)


@dataclass(frozen=True)
class ProbeData:
    """Pooled samples: SAE features [n, d_sae], residual [n, d_in] (or None), split (1: held out), each
    sample's document, labels."""

    sae: np.ndarray
    residual: np.ndarray | None
    held_out: np.ndarray
    documents: np.ndarray
    """The bootstrap's unit: windows of one document are not independent samples."""
    labels: dict[str, np.ndarray]
    """Per label name (subject, chapter), one string per sample."""


def why_unscored(task: str, scope: str | None, alone: bool, y_train: np.ndarray, y_val: np.ndarray) -> str | None:
    """Why one problem cannot be scored (None: it can): its class is the only one, or a split lacks a class."""
    where = "in the corpus" if scope is None else f"of {scope}"
    if alone:
        return f"the only {task} {where}: nothing to tell it apart from"
    rest = f"another {task}" + ("" if scope is None else f" of {scope}")
    gaps = [f"no {split} sample of {what}" for split, y in (("training", y_train), ("held-out", y_val))
            for what, n in ((f"this {task}", y.sum()), (rest, (~y).sum())) if n == 0]
    if not gaps:
        return None
    (tp, tn), (vp, vn) = _class_counts(y_train), _class_counts(y_val)
    return "; ".join(gaps) + f" (this {task} vs the rest: {tp} vs {tn} training, {vp} vs {vn} held-out samples)"


def why_task_unscored(task: str, within: str | None, skipped: list[tuple[str, str]],
                      alone: list[tuple[str, str]]) -> str:
    """Why a task has no scored problem, in one line for probing.json; `alone`: the skipped classes that are the
    only one of their scope."""
    if not skipped:
        return f"no sample carries a {task} label"
    if len(alone) == len(skipped):
        return f"the corpus has one {task} only ({alone[0][0]})" if within is None else \
            f"every {within} has one {task} only"
    name, reason = next(pair for pair in skipped if pair not in alone)
    return (f"no {task} has training and held-out samples of both classes: {len(skipped)} problems left out "
            f"(e.g. {name}: {reason}; each reason in {PROBING_FEATURES})")


def one_vs_rest(data: ProbeData, task: str, within: str | None, ks: Sequence[int], C: float,
                resamples: Resamples | None = None) -> TaskResult:
    """Every class of `data.labels[task]` against the rest, within each value of `within` (None: all samples)."""
    result = TaskResult(task)
    labels = data.labels[task]
    scopes = [None] if within is None else sorted(set(data.labels[within].tolist()))
    alone: list[tuple[str, str]] = []
    for scope in scopes:
        in_scope = np.ones(len(labels), bool) if scope is None else data.labels[within] == scope
        classes = sorted(set(labels[in_scope].tolist()))
        for cls in classes:
            y = labels == cls
            train, val = in_scope & ~data.held_out, in_scope & data.held_out
            why = why_unscored(task, scope, len(classes) == 1, y[train], y[val])
            if why is not None:
                result.skipped.append((cls, why))
                alone += [(cls, why)] if len(classes) == 1 else []
                continue
            resid = data.residual
            result.problems.append(probe_problem(
                cls, data.sae[train], data.sae[val], y[train], y[val], ks, C,
                None if resid is None else resid[train], None if resid is None else resid[val],
                None if resamples is None else resamples.of(val)))
    if not result.problems:
        result.reason = why_task_unscored(task, within, result.skipped, alone)
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
                     held_out=np.asarray(doc_split)[docs] == 1, documents=docs,
                     labels={name: np.array([labels[d][name] for d in docs.tolist()], dtype=object)
                             for name, _ in TASKS})


def probe_tasks(data: ProbeData, ks: Sequence[int], C: float, seed: int, resamples: int = RESAMPLES
                ) -> list[TaskResult]:
    """Every task's probes, with one bootstrap over the held-out documents shared by all problems."""
    drawn = resample_documents(data.documents, data.held_out, resamples, seed)
    return [one_vs_rest(data, name, within, ks, C, drawn) for name, within in TASKS]


def probe_metrics(data: ProbeData, tasks: list[TaskResult], ks: Sequence[int], window: int | None,
                  docs: tuple[int, int]) -> dict[str, object]:
    """probing.json: flat short keys (`subject_k1`, `subject_k1_lo`, `subject_k1_hi`, ..., `subject_resid`,
    `chapter_k5`, ...), why a task has no figure (`chapter_skipped`, null when it has one) and sample sizes."""
    metrics: dict[str, object] = {}
    for task in tasks:
        for k, key in [(k, f"{task.name}_k{k}") for k in ks] + [(None, f"{task.name}_resid")]:
            value, interval = task.mean(k), task.interval(k)
            metrics[key] = _round(value)
            metrics[f"{key}_lo"], metrics[f"{key}_hi"] = (None, None) if interval is None else map(_round, interval)
        metrics[f"{task.name}_problems"] = len(task.problems)
        metrics[f"{task.name}_left_out"] = len(task.skipped)
        metrics[f"{task.name}_skipped"] = task.reason
    metrics.update(train_samples=int((~data.held_out).sum()), val_samples=int(data.held_out.sum()),
                   train_docs=docs[0], val_docs=docs[1], window=window, procedure=PROCEDURE)
    return metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
