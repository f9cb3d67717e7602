"""Params of the last stage, `report`: plots, run_summary.json, README.md and the static feature browser."""

from __future__ import annotations

from dataclasses import dataclass

from saepipe.config.fields import check_positive


@dataclass(frozen=True)
class ReportConfig:
    """A run's analyses -> <analysis>/report/: plots, run_summary.json, README.md and browser/index.html."""

    table_features: int
    """Features listed in each of the README's two tables (most active, most interpretable-looking)."""
    table_examples: int
    """Top examples shown inline for each feature in those tables."""
    min_count: int
    """Fewest firings for a feature to rank as interpretable-looking (a share of few firings says little)."""
    heatmap_features: int
    """Most frequently firing features shown in the co-occurrence heatmap."""
    features_per_token: int
    """Features listed per token in the browser's token search."""
    dpi: int
    """Resolution of the PNG plots, in dots per inch."""

    def validate(self) -> None:
        check_positive("report", {name: getattr(self, name) for name in
                                  ("table_features", "table_examples", "min_count", "heatmap_features",
                                   "features_per_token", "dpi")})
