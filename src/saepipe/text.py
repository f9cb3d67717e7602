"""Counts in the lines people read (`1 outlier row`, `2 documents`): one rule for singular and plural."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n` with thousands separators and its noun, singular for exactly one; `plural` for irregular nouns
    (default: the noun + "s"). For a noun phrase, pass the counted word last: `count(1, "outlier row")`."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
