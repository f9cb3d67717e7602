"""Which features the report lists: the most active, and the most interpretable-looking by a stated rule."""

from __future__ import annotations

from typing import Any

from saepipe.analysis.token_baseline import RULE

ACTIVE_RULE = "the features that fire on the most tokens (ties by id)"
INTERPRETABLE_RULE = RULE + " (then more firings, then id)"


def concentration(record: dict[str, Any]) -> float:
    """The share of a feature's firings on its most frequent token (0 for a dead feature)."""
    if not record["count"] or not record["top_tokens"]:
        return 0.0
    return record["top_tokens"][0]["count"] / record["count"]


def most_active(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    alive = [r for r in records if r["count"] > 0]
    return sorted(alive, key=lambda r: (-r["count"], r["id"]))[:n]


def most_interpretable(records: list[dict[str, Any]], baseline: dict[int, dict[str, Any]], n: int,
                       min_count: int) -> list[dict[str, Any]]:
    """The features the token baseline scores highest once weighted by rarity (INTERPRETABLE_RULE), each record
    with its baseline scores under "baseline"; [] when `saepipe interp` has not run."""
    eligible = [{**r, "baseline": baseline[r["id"]]} for r in records
                if r["count"] >= min_count and r["id"] in baseline]
    return sorted(eligible, key=lambda r: (-r["baseline"]["score"], -r["count"], r["id"]))[:n]
