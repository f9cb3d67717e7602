"""Params of the last stage, `report`: plots, run_summary.json, README.md and the static feature browser."""

from __future__ import annotations

from dataclasses import dataclass

from saepipe.config.fields import bounded


@dataclass(frozen=True)
class ReportConfig:
    """A run's analyses -> <analysis>/report/: plots, run_summary.json, README.md and browser/index.html."""

    table_features: int = bounded(1, 100)
    """Features listed in each of the README's two tables (most active, most interpretable-looking)."""
    table_examples: int = bounded(1, 100)
    """Top examples shown inline for each feature in those tables (at most summarize.top_k exist)."""
    min_count: int = bounded(1)
    """Fewest firings for a feature to rank as interpretable-looking (a share of few firings says little)."""
    heatmap_features: int = bounded(1, 100)
    """Most frequently firing features shown in the co-occurrence heatmap: its side grows 0.22 in a feature,
    so the bound, at the highest dpi, keeps the figure under 8,000 pixels a side."""
    features_per_token: int = bounded(1, 100)
    """Features listed per token in the browser's token search (one entry per corpus token in tokens.js)."""
    dpi: int = bounded(1, 300)
    """Resolution of the PNG plots, in dots per inch."""
