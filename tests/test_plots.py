"""The report's figures, checked on the matplotlib objects they are saved from (bins, axis limits, legend
placement, labels), drawn from made-up inputs shaped like a real run's."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.report import build, plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, in order, laid out as saved (save() runs as usual)."""
    figures = []
    save = plots.save

    def keep(fig, path, dpi):
        figures.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "save", keep)
    return figures


@pytest.mark.parametrize("top", [40, 150, 174, 1234])
def test_l0_bins_are_whole_numbers_of_integer_values(drawn, tmp_path, top) -> None:
    rng = np.random.default_rng(top)
    l0 = np.append(rng.integers(0, top + 1, 5000), top)
    splits = (rng.random(len(l0)) < 0.2).astype(int)
    plots.l0_distribution(l0, splits, "L0", tmp_path / "l0.png", 50)
    (ax,) = drawn[0].axes
    assert len(ax.patches) == 2  # one outline per split
    for patch in ax.patches:
        edges = np.unique(patch.get_xy()[:, 0])
        assert np.allclose(edges + 0.5, np.round(edges + 0.5))  # every edge between two integers
        widths = np.diff(edges)
        assert np.all(widths == widths[0]) and widths[0] == round(widths[0]) >= 1
        assert edges[0] == -0.5 and edges[-1] >= top + 0.5 > edges[-1] - widths[0]
        assert len(widths) <= plots.L0_MAX_BINS


def training_history(dead: list[float]) -> list[dict]:
    return [{"epoch": e + 1, "loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "fvu": 0.5, "val_fvu": 0.6,
             "l0": 32.0, "val_l0": 35.0, "dead_feature_percentage": d, "val_dead_feature_percentage": d / 2}
            for e, d in enumerate(dead)]


def dead_panel(fig):
    return next(ax for ax in fig.axes if ax.get_title().startswith("dead features"))


def test_dead_features_panel_without_dead_features_starts_at_zero_and_says_so(drawn, tmp_path) -> None:
    plots.training_history(training_history([0.0] * 5), "run", tmp_path / "h.png", 50)
    ax = dead_panel(drawn[0])
    low, high = ax.get_ylim()
    assert high >= 0.5 and -0.1 * high <= low <= 0  # a percent scale from 0, not -0.04..0.04 around a flat 0
    assert any("no dead features" in t.get_text() for t in ax.texts)


def test_dead_features_panel_with_dead_features_shows_them_all_from_zero(drawn, tmp_path) -> None:
    dead = [12.5, 4.0, 0.5, 0.0]
    plots.training_history(training_history(dead), "run", tmp_path / "h.png", 50)
    ax = dead_panel(drawn[0])
    low, high = ax.get_ylim()
    assert max(dead) < high and -0.1 * high <= low <= 0
    assert not any("no dead features" in t.get_text() for t in ax.texts)


def density_rows(counts: list[int], start: float = -4.0, width: float = 0.25) -> list[dict]:
    return [{"bin_low": start + i * width, "bin_high": start + (i + 1) * width, "features": c}
            for i, c in enumerate(counts)]


SHAPES = {
    "bell": [3, 10, 60, 200, 520, 1230, 1400, 800, 240, 75, 20, 2, 0, 0, 0, 0],  # the default run's
    "tallest at the right": [0, 0, 0, 0, 2, 10, 40, 100, 300, 600, 900, 1200, 1300, 1400, 1500, 1600],
    "tallest at the left": [1600, 1500, 1400, 900, 300, 100, 10, 2, 0, 0, 0, 0, 0, 0, 0, 0],
    "flat": [500] * 16,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dead", [3, 2000])
def test_density_legend_covers_no_bar_and_stays_in_the_figure(drawn, tmp_path, shape, dead) -> None:
    counts = SHAPES[shape]
    plots.feature_density(density_rows(counts), dead, 4665, sum(counts) + dead, "density", tmp_path / "d.png", 50)
    fig = drawn[0]
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
    assert len(bars) == sum(c > 0 for c in counts) + 1  # the alive bars and the dead bar
    tallest = max(bars, key=lambda b: b.height)
    assert not legend.overlaps(tallest)
    assert not any(legend.overlaps(b) for b in bars)
    labels = [ax.xaxis.label, *ax.get_xticklabels(), *ax.texts]
    assert not any(legend.overlaps(t.get_window_extent(renderer)) for t in labels if t.get_text())
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1  # in the saved image, whole
    assert fig.bbox.y0 <= legend.y0 and legend.y1 <= fig.bbox.y1


def record(fid: int, counts: list[int], token: str = " energy") -> dict:
    return {"id": fid, "count": sum(counts), "top_tokens": [{"token": token if i == 0 else f" t{i}", "count": c}
                                                         for i, c in enumerate(counts)]}


def test_heatmap_labels_name_the_top_token_only_where_it_holds_a_real_share() -> None:
    spread = record(1289, [13] + [1] * 987)  # its top token holds 1.3 % of its firings
    assert build.heatmap_label(spread) == "#1289"
    held = record(2800, [86, 10, 4], ",")
    assert build.heatmap_label(held) == "#2800 ',' 86%"
    share = round(100 * build.LABEL_SHARE)
    at_rule = record(7, [share, 100 - share], " the")
    assert build.heatmap_label(at_rule) == f"#7 ' the' {share}%"
    below = record(8, [share - 1, 101 - share], " the")
    assert build.heatmap_label(below) == "#8"
    assert build.heatmap_label({"id": 9, "count": 0, "top_tokens": []}) == "#9"  # dead
    assert f"{build.LABEL_SHARE:.0%}" in build.LABEL_RULE
