"""One feature summarised as a JSON object: what `feature_summaries.jsonl` holds, one line per feature.

    id, alive, count, density, mean, max, quantiles     from the activation DB (over the tokens it fires on)
    top_examples          the k strongest activations: decoded window, marked token, per-token activations
    quantile_examples     {q: examples centred on the q-quantile of its activations}, lower bands
    top_tokens            the tokens it fires on most often [{id, token, count, token_share}]
    promoted_tokens / suppressed_tokens   logit lens of its decoder direction [{id, token, logit}]
    nearest_features      by decoder cosine [{id, cosine}] (from the matrices stage)
    cooccurring_features  by Jaccard of the tokens both fire on [{id, jaccard, count}] (likewise)

`summary_index.json` keeps, per feature, only what a listing needs: id, density, max and top token strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from saepipe.analysis.activation_db import ActivationDB


@dataclass(frozen=True)
class SummaryOptions:
    top_k: int
    context: tuple[int, int]
    quantile_bands: list[float]
    quantile_examples: int
    top_tokens: int
    neighbours: int


@dataclass(frozen=True)
class FeatureTables:
    """Per-feature arrays computed for all features at once: logit lens and neighbours ([d_sae, k] each)."""

    promoted: tuple[np.ndarray, np.ndarray]
    suppressed: tuple[np.ndarray, np.ndarray]
    nearest: tuple[np.ndarray, np.ndarray]
    cooccurring: tuple[np.ndarray, np.ndarray, np.ndarray]


def top_tokens(db: ActivationDB, rows: np.ndarray, n: int) -> list[dict[str, Any]]:
    """The `n` tokens most often among `rows`, most frequent first (ties by token id), each with the share of
    its own occurrences that are among `rows` (`token_share`: a ")" among many firings may be 1 % of the
    corpus's ")"s, a name 100 % of its)."""
    ids, counts = np.unique(db.row_token[rows], return_counts=True)
    order = np.lexsort((ids, -counts))[:n]
    totals = db.token_totals
    return [{"id": int(ids[i]), "token": db.piece(int(ids[i])), "count": int(counts[i]),
             "token_share": round(float(counts[i] / max(totals[ids[i]], 1)), 4)} for i in order]


def _token_list(db: ActivationDB, ids: np.ndarray, values: np.ndarray, key: str) -> list[dict[str, Any]]:
    return [{"id": int(t), "token": db.piece(int(t)), key: round(float(v), 4)}
            for t, v in zip(ids, values, strict=True)]


def feature_summary(db: ActivationDB, f: int, options: SummaryOptions, tables: FeatureTables) -> dict[str, Any]:
    stats = db.feature_stats(f)
    summary: dict[str, Any] = {
        "id": f, "alive": bool(stats["alive"]), "count": stats["count"], "density": stats["density"],
        "mean": stats["mean"], "max": stats["max"], "quantiles": stats["quantiles"],
    }
    if stats["alive"]:
        rows, _ = db.feature_rows(f)
        summary["top_examples"] = [e.to_dict() for e in db.examples(f, rows[: options.top_k], options.context)]
        summary["quantile_examples"] = {
            f"{q:g}": [e.to_dict() for e in db.quantile_examples(f, q, options.quantile_examples, options.context)]
            for q in options.quantile_bands}
        summary["top_tokens"] = top_tokens(db, rows, options.top_tokens)
    else:
        summary.update(top_examples=[], quantile_examples={f"{q:g}": [] for q in options.quantile_bands},
                       top_tokens=[])
    summary["promoted_tokens"] = _token_list(db, tables.promoted[0][f], tables.promoted[1][f], "logit")
    summary["suppressed_tokens"] = _token_list(db, tables.suppressed[0][f], tables.suppressed[1][f], "logit")
    n = options.neighbours
    summary["nearest_features"] = [{"id": int(i), "cosine": round(float(v), 4)}
                                   for i, v in zip(tables.nearest[0][f][:n], tables.nearest[1][f][:n], strict=True)]
    ids, jaccard, counts = (a[f][:n] for a in tables.cooccurring)
    summary["cooccurring_features"] = [{"id": int(i), "jaccard": round(float(j), 4), "count": int(c)}
                                       for i, j, c in zip(ids, jaccard, counts, strict=True) if c > 0]
    return summary


def index_entry(summary: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    return {"id": summary["id"], "density": summary["density"], "max": summary["max"],
            "top_tokens": [t["token"] for t in summary["top_tokens"][:n_tokens]]}
