"""The report's plots: matplotlib PNGs, drawn on the Agg canvas (no pyplot, no display, no global state).

Each function takes data the earlier stages wrote (already read) and one output path. The only reading done
here is of the matrices stage's files, by row blocks, so a d_sae x d_sae matrix never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.storage import open_npy, read_npz

TRAINING_PANELS = (
    ("loss", "loss", "training objective (normalised MSE + penalties)"),
    ("fvu", "FVU", "fraction of variance unexplained"),
    ("l0", "L0", "features active per token"),
    ("dead_feature_percentage", "dead features (%)", "latents that did not fire in the window"),
)
SPLIT_NAMES = {0: "train", 1: "validation"}
COLORS = {"train": "#1f77b4", "validation": "#ff7f0e", "clean": "#2ca02c", "sae": "#1f77b4", "zero": "#7f7f7f",
          "mean": "#9467bd", "dead": "#d62728"}
L0_MAX_BINS = 150
"""Most bins of the L0 histogram: unit bins while there are no more L0 values, then bins of a whole number of
them."""
LEGEND_GAP = 0.1
"""Room between the density plot's tallest bar (and the count above the dead bar) and its legend, a share of
the axes' height."""
DEAD_AXIS_TOP = 1.0
"""The dead-features panel's y axis reaches at least this many percent (an all-zero history gets an axis)."""


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=dpi)
    return path


def training_history(history: Sequence[dict[str, Any]], title: str, path: Path, dpi: int) -> Path:
    """Training and validation curves per epoch: loss, FVU, L0 and dead features, one panel each."""
    fig = figure(10, 6.5)
    epochs = [entry["epoch"] for entry in history]
    for i, (key, label, meaning) in enumerate(TRAINING_PANELS):
        ax = fig.add_subplot(2, 2, i + 1)
        for split, name in (("train", key), ("validation", f"val_{key}")):
            values = [entry.get(name) for entry in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, marker="o", color=COLORS[split], label=split)
        ax.set_title(f"{label}: {meaning}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_xticks(epochs if len(epochs) <= 12 else np.linspace(epochs[0], epochs[-1], 12).round())
        ax.grid(alpha=0.3)
        if key == "dead_feature_percentage":
            dead_axis(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    return save(fig, path, dpi)


def dead_axis(ax: Any, values: Sequence[float]) -> None:
    """A percentage axis from 0 for the dead-features panel: matplotlib would centre a flat zero line on
    -0.04..0.04, negative percentages that cannot occur; with no dead feature at all, it says so."""
    peak = max(values, default=0.0)
    top = max(DEAD_AXIS_TOP, 1.15 * peak)
    ax.set_ylim(-0.04 * top, top)  # a sliver below 0 so that the markers on 0 are not cut in half
    if peak == 0:
        ax.text(0.5, 0.5, "no dead features at any epoch", transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="#555555")


def l0_edges(top: int) -> np.ndarray:
    """Bin edges on half-integers, every bin the same whole number of L0 values wide (at most L0_MAX_BINS
    bins): L0 is an integer, and bins of a fractional width hold alternately n and n + 1 values (a comb)."""
    width = max(1, -(-(top + 1) // L0_MAX_BINS))
    return np.arange(0, top + width + 1, width) - 0.5


def l0_distribution(l0: np.ndarray, splits: np.ndarray, title: str, path: Path, dpi: int) -> Path:
    """How many features are active per token, as a histogram per split, means marked."""
    fig = figure(8, 4.5)
    ax = fig.add_subplot()
    top = int(l0.max()) if len(l0) else 1
    edges = l0_edges(top)
    for code, name in SPLIT_NAMES.items():
        values = l0[splits == code]
        if len(values):
            ax.hist(values, bins=edges, histtype="stepfilled", alpha=0.45, color=COLORS[name],
                    label=f"{name}: {len(values):,} tokens, mean {values.mean():.1f}")
            ax.axvline(values.mean(), color=COLORS[name], linestyle="--", linewidth=1)
    width = int(edges[1] - edges[0])
    ax.set_xlabel("L0: features active on a token" + (f" (bins of {width} values)" if width > 1 else ""))
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save(fig, path, dpi)


def feature_density(histogram: Sequence[dict[str, Any]], dead: int, tokens: int, d_sae: int, title: str,
                    path: Path, dpi: int) -> Path:
    """evaluate's log10-density histogram of alive features, with the dead features as a bar of their own."""
    fig = figure(8, 4.5)
    ax = fig.add_subplot()
    lows = np.array([row["bin_low"] for row in histogram], dtype=float)
    highs = np.array([row["bin_high"] for row in histogram], dtype=float)
    counts = np.array([row["features"] for row in histogram], dtype=float)
    width = float(np.median(highs - lows)) if len(lows) else 0.25
    alive = d_sae - dead
    if len(lows):
        ax.bar(lows, counts, width=highs - lows, align="edge", edgecolor="white", color=COLORS["sae"],
               label=f"alive: {alive:,} features")
    dead_at = (lows.min() if len(lows) else 0.0) - 2 * width
    ax.bar([dead_at], [dead], width=width, align="edge", color=COLORS["dead"],
           label=f"dead: {dead:,} features (never fire on the {tokens:,} tokens)")
    ax.annotate(f"{dead:,}", (dead_at + width / 2, dead), ha="center", va="bottom", fontsize=8)
    first = lows.min() if len(lows) else 0.0
    ax.axvline(first - width / 2, color="black", linewidth=0.8, linestyle=":")  # the dead bar is off the axis
    last = highs.max() if len(highs) else 0.0
    ticks = np.arange(np.ceil(first * 2) / 2, last + 1e-9, 0.5 if last - first <= 3 else 1.0)
    ax.set_xticks([dead_at + width / 2, *ticks], ["dead", *(f"{t:g}" for t in ticks)])
    ax.set_xlabel("log10(firing density): density = fraction of evaluated tokens a feature fires on")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    legend_above_bars(fig, ax, ax.legend(fontsize=9, loc="upper right"), max(counts.max(initial=0), dead))
    return save(fig, path, dpi)


def legend_above_bars(fig: Any, ax: Any, legend: Any, peak: float) -> None:
    """Raise the y axis until the tallest bar ends below the legend: inside, wherever it went, some run's bars
    would lie under it ("best" finds no free corner in a histogram), and below the axes it meets the label."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    share = legend.get_window_extent(renderer).height / ax.get_window_extent(renderer).height
    ax.set_ylim(0, max(peak, 1) / max(1 - share - LEGEND_GAP, 0.3))


def ablation_bars(ablation: dict[str, Any], title: str, path: Path, dpi: int) -> Path:
    """Next-token cross-entropy and KL from the clean run with the hook clean, spliced with the SAE's
    reconstruction, zeroed and mean-ablated (evaluate's ablation pass)."""
    fig = figure(9, 4.2)
    panels = (("ce", ("clean", "sae", "zero", "mean"), "cross-entropy (nats per token)"),
              ("kl", ("sae", "zero", "mean"), "KL(clean || variant) (nats per token)"))
    names = {"clean": "clean", "sae": "SAE\nspliced in", "zero": "zero-\nablated", "mean": "mean-\nablated"}
    for i, (key, variants, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [float(ablation[f"{key}_{v}"]) for v in variants]
        bars = ax.bar([names[v] for v in variants], values, color=[COLORS[v] for v in variants])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_title("next-token loss" if key == "ce" else "change of the next-token distribution", fontsize=10)
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    return save(fig, path, dpi)


def pairwise_cosines(matrices: Path, similarity: str, topk: str, edges: np.ndarray, block: int = 1024
                     ) -> tuple[np.ndarray, str]:
    """Counts of decoder cosines in `edges`: every pair i < j from the dense matrix when the matrices stage
    wrote it (read by row blocks), else each feature's top-k nearest from its top-k file."""
    counts = np.zeros(len(edges) - 1, np.int64)
    dense = matrices / similarity
    if dense.is_file():
        matrix = open_npy(dense, "matrices")
        n = matrix.shape[0]
        for start in range(0, n, block):
            rows = np.asarray(matrix[start : start + block], dtype=np.float32)
            above = np.arange(n)[None, :] > np.arange(start, start + len(rows))[:, None]
            counts += np.histogram(rows[above], bins=edges)[0]
        return counts, f"all {n * (n - 1) // 2:,} feature pairs"
    values = read_npz(matrices / topk, ("values",), "matrices")["values"]
    counts += np.histogram(values.ravel(), bins=edges)[0]
    return counts, f"each feature's {values.shape[1]} nearest (no dense matrix)"


def decoder_similarity(max_cosine: Sequence[dict[str, Any]], pairs: tuple[np.ndarray, str], edges: np.ndarray,
                       title: str, path: Path, dpi: int) -> Path:
    """Decoder cosine similarity: each feature's nearest other feature (the matrices stage's histogram), and
    the distribution over pairs."""
    fig = figure(10, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    centres = np.array([row["max_cosine"] for row in max_cosine], dtype=float)
    width = 2.0 / max(len(centres), 1)
    ax.bar(centres, [row["features"] for row in max_cosine], width=width, color=COLORS["sae"], edgecolor="white")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("max cosine to any other feature's decoder row")
    ax.set_ylabel("features")
    ax.set_title("nearest neighbour per feature (near 1: duplicates)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax = fig.add_subplot(1, 2, 2)
    counts, what = pairs
    ax.stairs(counts, edges, fill=True, color=COLORS["mean"])
    ax.set_yscale("log")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine between decoder rows")
    ax.set_ylabel("pairs (log scale)")
    ax.set_title(what, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    return save(fig, path, dpi)


def cooccurrence_block(matrices: Path, jaccard: str, topk: str, ids: np.ndarray) -> np.ndarray:
    """Jaccard index between the features `ids`: from the dense matrix when written, else the top-k lists
    (pairs not among a feature's top co-occurring ones then read as 0)."""
    dense = matrices / jaccard
    if dense.is_file():
        matrix = open_npy(dense, "matrices")
        return np.asarray(matrix[ids][:, ids], dtype=np.float32)  # reads only those rows
    where = {int(f): i for i, f in enumerate(ids)}
    block = np.zeros((len(ids), len(ids)), np.float32)
    partners, values = read_npz(matrices / topk, ("ids", "jaccard"), "matrices").values()
    for i, f in enumerate(ids):
        for j, v in zip(partners[f], values[f], strict=True):
            if int(j) in where:
                block[i, where[int(j)]] = block[where[int(j)], i] = v
    np.fill_diagonal(block, 1.0)
    return block


def cluster_order(block: np.ndarray) -> np.ndarray:
    """An order that puts features which fire together next to each other (average linkage on 1 - Jaccard)."""
    if len(block) < 3:
        return np.arange(len(block))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = 1.0 - np.clip((block + block.T) / 2, 0.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def cooccurrence_heatmap(block: np.ndarray, labels: Sequence[str], title: str, path: Path, dpi: int) -> Path:
    """The Jaccard index between the most frequent features, clustered, the diagonal (always 1) blanked."""
    size = max(6.0, 0.22 * len(labels) + 2.5)
    fig = figure(size + 1.2, size)
    ax = fig.add_subplot()
    shown = np.ma.masked_array(block, mask=np.eye(len(block), dtype=bool))
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=max(float(shown.max() or 0.0), 1e-6),
                      interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Jaccard index: tokens both fire on / either fires on")
    ax.set_title(title, fontsize=10)
    return save(fig, path, dpi)
