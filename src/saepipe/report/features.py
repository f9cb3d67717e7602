"""Which features the report lists: the most active, and the most interpretable-looking by a stated heuristic."""

from __future__ import annotations

from typing import Any

ACTIVE_RULE = "the features that fire on the most tokens (ties by id)"
INTERPRETABLE_RULE = (
    "token concentration: the share of a feature's firings that land on its single most frequent token, "
    "among features that fire at least {min_count} times and whose most frequent token contains a letter "
    "(punctuation and line-break features are easy to read but say little); highest share first, then more "
    "firings, then id. A feature that fires on one word reads at a glance; one spread over many tokens may "
    "still mean something, but needs its examples to say what")


def concentration(record: dict[str, Any]) -> float:
    """The share of a feature's firings on its most frequent token (0 for a dead feature)."""
    if not record["count"] or not record["top_tokens"]:
        return 0.0
    return record["top_tokens"][0]["count"] / record["count"]


def most_active(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    alive = [r for r in records if r["count"] > 0]
    return sorted(alive, key=lambda r: (-r["count"], r["id"]))[:n]


def has_letter(record: dict[str, Any]) -> bool:
    return bool(record["top_tokens"]) and any(c.isalpha() for c in record["top_tokens"][0]["token"])


def most_interpretable(records: list[dict[str, Any]], n: int, min_count: int) -> list[dict[str, Any]]:
    eligible = [r for r in records if r["count"] >= min_count and has_letter(r)]
    return sorted(eligible, key=lambda r: (-concentration(r), -r["count"], r["id"]))[:n]
