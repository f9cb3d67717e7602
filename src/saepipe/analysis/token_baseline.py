"""The token baseline: a feature explained by the tokens it fires on, scored by a rule judge. Needs no model.

Explanation: the feature's most frequent tokens among its firings — at most `n_tokens`, each holding at least
MIN_SHARE of them and fired on at MIN_PRECISION of its own occurrences or more — with their shares, e.g.
`" friction" 62%, " frictional" 11%`; written from every firing except the held-out ones the scorers use.
Scoring: autointerp's detection and fuzzing harness (held-out
activating windows drawn across the activation range, as many windows where the feature never fires),
judged by `TokenJudge` (Yes when the excerpt, or its marked part, holds one of the explanation's tokens).
A feature that fires on every occurrence of one word scores near 1; one spread over many tokens, or on a
token as common where it does not fire, scores lower. It is what a reader gets from the token list alone,
so it is the floor a written (LLM) explanation has to beat.

Ranking (the report's "most interpretable" table): score = mean(detection, fuzzing) x rarity, where a token's
rarity is 1 - log(its occurrences) / log(counted rows) (1 for a token seen once, 0 for one on every row) and a
feature's rarity is the share-weighted mean over its explanation's tokens: a feature on " the" reads at a
glance and scores well, but says little about the text; one on " friction" says more.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from saepipe.analysis.activation_db import ActivationDB, Example
from saepipe.analysis.autointerp import Explanation, FeatureExamples, TokenJudge, score_feature

MIN_SHARE = 0.05
"""A token joins a feature's explanation only if it holds at least this share of the feature's firings..."""
MIN_PRECISION = 0.1
"""... and the feature fires on at least this share of the token's own occurrences."""
RULE = ("token baseline score x rarity: the mean of the token baseline's detection and fuzzing (a rule judge: "
        "does the excerpt, or its marked part, hold one of the feature's top tokens?) times the share-weighted "
        "rarity of those tokens, 1 - log(occurrences) / log(tokens) (0 for a token on every row), among features "
        "that fire at least {min_count} times; highest first")


def token_explanation(token_ids: np.ndarray, piece: Callable[[int], str], n_tokens: int,
                      totals: np.ndarray | None = None) -> tuple[Explanation, list[dict[str, Any]]]:
    """The explanation written from the token ids of a feature's firings, and its tokens with their shares of
    them. With `totals` (each token id's occurrences), a token the feature fires on at fewer than MIN_PRECISION
    of its occurrences is left out: it would say Yes mostly where the feature is silent."""
    ids, counts = np.unique(np.asarray(token_ids), return_counts=True)
    order = np.lexsort((ids, -counts))[:n_tokens]
    shares = counts[order] / max(len(token_ids), 1)
    precise = np.ones(len(order), bool) if totals is None else counts[order] >= MIN_PRECISION * totals[ids[order]]
    keep = [i for i, share, ok in zip(order, shares, precise, strict=True) if share >= MIN_SHARE and ok] \
        or order[:1].tolist()
    listed = [{"id": int(ids[i]), "token": piece(int(ids[i])), "share": round(float(counts[i] / len(token_ids)), 4)}
              for i in keep]
    text = ", ".join(f"{json.dumps(t['token'], ensure_ascii=False)} {t['share']:.0%}" for t in listed)
    return Explanation(text, tuple(t["token"] for t in listed)), listed


def rarity(listed: list[dict[str, Any]], token_totals: np.ndarray, n_rows: int) -> float:
    """Share-weighted rarity of an explanation's tokens (see the module docstring)."""
    weights = np.array([t["share"] for t in listed])
    occurrences = np.maximum(token_totals[[t["id"] for t in listed]], 1)
    per_token = 1.0 - np.log(occurrences) / np.log(max(n_rows, 2))
    return float(np.clip((weights * per_token).sum() / weights.sum(), 0.0, 1.0))


class DocumentWindows:
    """Every row's window of `context` (before, after) rows of its document, as DB rows (-1 past the document's
    ends), with each token decoded once: what the rule judge needs of thousands of features, without building
    text windows one token cache read at a time."""

    def __init__(self, db: ActivationDB, context: tuple[int, int]):
        self.db, self.before = db, context[0]
        self.order = db.rows_in_document_order
        self.index = np.empty(db.n_rows, np.int64)
        self.index[self.order] = np.arange(db.n_rows)
        self.lo, self.hi = db.doc_offsets[db.row_doc], db.doc_offsets[db.row_doc.astype(np.int64) + 1]
        self.offsets = np.arange(-context[0], context[1] + 1)
        present = np.unique(db.row_token)
        self.pieces = np.empty(int(present.max()) + 1 if len(present) else 0, dtype=object)
        self.pieces[present] = [db.piece(int(t)) for t in present]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), before + after + 1] DB rows; row i's own row sits at column `before`."""
        rows = np.asarray(rows, np.int64)
        at = self.index[rows][:, None] + self.offsets
        inside = (at >= self.lo[rows][:, None]) & (at < self.hi[rows][:, None])
        return np.where(inside, self.order[np.clip(at, 0, len(self.order) - 1)], -1)

    def examples(self, windows: np.ndarray, on: np.ndarray) -> list[Example]:
        """The rule judge's examples (tokens and a 1/0 firing pattern) of `rows` windows and where the feature
        fires on them (`on`, the same shape)."""
        out = []
        for window, fires in zip(windows, on, strict=True):
            kept = window >= 0
            out.append(Example(doc=-1, position=-1, activation=0.0, marked=0,
                               tokens=self.pieces[self.db.row_token[window[kept]]].tolist(),
                               activations=fires[kept].astype(float).tolist()))
        return out


@dataclass(frozen=True)
class BaselineScore:
    feature: int
    count: int
    explanation: Explanation
    tokens: list[dict[str, Any]]
    detection: float
    fuzzing: float
    rarity: float

    @property
    def score(self) -> float:
        return round((self.detection + self.fuzzing) / 2 * self.rarity, 4)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.feature, "explanation": self.explanation.text, "tokens": self.tokens,
                "detection": self.detection, "fuzzing": self.fuzzing, "rarity": round(self.rarity, 4),
                "score": self.score, "count": self.count}


def held_out_ranks(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """One rank from each of k equal bands of n firings (strongest first): the scorers see weak ones too."""
    return np.array([int(rng.choice(band)) for band in np.array_split(np.arange(n), min(k, n))], np.int64)


def score_baseline(db: ActivationDB, windows: DocumentWindows, f: int, rows: np.ndarray, score_examples: int,
                   n_tokens: int, seed: int, candidates: np.ndarray) -> BaselineScore | None:
    """The token baseline of feature f (firing on `rows`, strongest first), or None when it fires too rarely to
    hold out `score_examples` firings and explain from the rest, or so densely that no window free of it
    turns up."""
    if len(rows) <= score_examples:
        return None
    rng = np.random.default_rng([seed, f])
    held = held_out_ranks(len(rows), score_examples, rng)
    rest = np.ones(len(rows), bool)
    rest[held] = False
    explanation, listed = token_explanation(db.row_token[rows[rest]], windows.pieces.__getitem__, n_tokens,
                                            db.token_totals)
    shown = windows.rows(np.concatenate([rows[held], candidates[rng.integers(len(candidates),
                                                                        size=4 * score_examples)]]))
    on = np.isin(shown, rows, kind="table") & (shown >= 0)
    free = np.flatnonzero(~on[len(held):].any(axis=1))[: len(held)] + len(held)
    if not len(free):
        return None
    activating = windows.examples(shown[: len(held)], on[: len(held)])
    examples = FeatureExamples(f, [], activating, windows.examples(shown[free], on[free]))
    scores = score_feature(TokenJudge(), explanation, examples, seed + f, keep_windows=False)
    return BaselineScore(f, len(rows), explanation, listed, scores["detection"], scores["fuzzing"],
                         rarity(listed, db.token_totals, int(db.counted.sum())))


def token_baseline(db: ActivationDB, context: tuple[int, int], score_examples: int, n_tokens: int, seed: int,
                   progress: Any = None) -> list[dict[str, Any]]:
    """The baseline of every alive feature that `score_baseline` can score, in id order."""
    windows = DocumentWindows(db, context)
    candidates = np.flatnonzero(db.counted)
    records = []
    for f, rows in db.each_feature_rows():
        if not len(rows):
            continue
        result = score_baseline(db, windows, f, rows, score_examples, n_tokens, seed, candidates)
        if result is not None:
            records.append(result.to_dict())
        if progress is not None:
            progress.update(1)
    return records


def paired_baseline(db: ActivationDB, examples: FeatureExamples, n_tokens: int) -> Explanation:
    """The token baseline's explanation of a feature an LLM explains, written from every firing except the
    LLM's held-out windows, so both are scored on the same windows."""
    rows, _ = db.feature_rows(examples.feature)
    held = {(e.doc, e.position) for e in examples.activating}
    keep = np.array([(int(d), int(p)) not in held for d, p in zip(db.row_doc[rows], db.row_position[rows],
                                                                  strict=True)], bool)
    explanation, _ = token_explanation(db.row_token[rows[keep]], db.piece, n_tokens, db.token_totals)
    return explanation
