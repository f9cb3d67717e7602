"""Counts in the lines people read: singular for exactly one, plural otherwise, irregular plurals given."""

from __future__ import annotations

import pytest

from saepipe.stages.evaluate import summary
from saepipe.text import count


@pytest.mark.parametrize(("n", "noun", "plural", "expected"), [
    (1, "document", None, "1 document"),
    (0, "document", None, "0 documents"),
    (2, "outlier row", None, "2 outlier rows"),
    (1, "forward pass", "forward passes", "1 forward pass"),
    (3, "forward pass", "forward passes", "3 forward passes"),
    (12345, "token", None, "12,345 tokens"),
])
def test_count_picks_the_noun_by_the_number(n, noun, plural, expected) -> None:
    assert count(n, noun, plural) == expected


def test_evaluate_summary_counts_one_outlier_and_one_document_in_the_singular(tmp_path) -> None:
    """evaluate's first lines with one of each (the old ones said `1 documents (1 outlier rows ...)`)."""
    figures = {
        "evaluated": {"sae_type": "topk", "d_in": 4, "d_sae": 8, "hook": "blocks.0.hook_resid_post",
                      "split": "validation", "documents": 1},
        "sparsity": {"tokens": 1, "l0_mean": 1.0, "l0_median": 1.0, "l0_p90": 1.0, "dead_features": 1,
                     "dead_feature_percentage": 12.5, "features_firing_over_1pct": 1, "features_firing_over_10pct": 1},
        "reconstruction": {"outlier_rows": 1, "outliers_included": False,
                           **dict.fromkeys(("fvu", "explained_variance", "fvu_with_outliers", "mse", "cos_sim",
                                            "l2_ratio", "relative_reconstruction_bias"), 0.5)},
        "timing": {"seconds": 1.0},
    }
    text = summary(figures, tmp_path)
    assert "1 cached row of 1 document (1 outlier row left out)" in text
