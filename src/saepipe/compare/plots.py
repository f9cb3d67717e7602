"""The frontier: FVU and CE loss recovered against L0, one labelled point per run, the Pareto front drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from saepipe.compare.table import pareto_front
from saepipe.report.plots import figure, save

MARKERS = {"batch_topk": "o", "topk": "s", "matryoshka": "D", "standard": "^", "jumprelu": "v"}
PANELS = (("fvu", "FVU (fraction of variance unexplained)", False),
          ("ce_recovered", "CE loss recovered (1 = as good as the model)", True))


def frontier(names: Sequence[str], architectures: Sequence[str], metrics: Sequence[dict[str, float | None]],
             title: str, path: Path, dpi: int = 120) -> Path:
    """One panel per figure against L0: each run a labelled point (marker = architecture), the runs no other
    beats at equal or lower L0 joined as the Pareto front."""
    fig = figure(11, 4.8)
    for i, (key, label, higher) in enumerate(PANELS):
        ax = fig.add_subplot(1, 2, i + 1)
        l0 = [m.get("l0") for m in metrics]
        score = [m.get(key) for m in metrics]
        have = [j for j in range(len(names)) if l0[j] is not None and score[j] is not None]
        for arch in sorted({architectures[j] for j in have}):
            members = [j for j in have if architectures[j] == arch]
            ax.scatter([l0[j] for j in members], [score[j] for j in members], marker=MARKERS.get(arch, "x"),
                       s=46, label=arch, zorder=3)
        for j, dy in label_offsets([l0[j] for j in have], [score[j] for j in have], have):
            ax.annotate(names[j], (l0[j], score[j]), textcoords="offset points", fontsize=7, xytext=(5, dy))
        front = [have[j] for j in pareto_front([l0[j] for j in have], [score[j] for j in have], higher)]
        if len(front) > 1:
            ax.plot([l0[j] for j in front], [score[j] for j in front], color="0.3", lw=1.2, ls="--",
                    label="Pareto front", zorder=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.set_title(f"{key} against L0 ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3)
        if have:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save(fig, path, dpi)


def label_offsets(x: Sequence[float], y: Sequence[float], ids: Sequence[int]) -> list[tuple[int, int]]:
    """A vertical offset (points) per label: runs within 3 % of the L0 range of one another form a cluster, the
    highest labelled above its point and the rest below, one line apart, so near-identical runs stay legible."""
    order = sorted(range(len(ids)), key=lambda i: x[i])
    span = (max(x) - min(x)) or 1.0
    clusters: list[list[int]] = []
    for i in order:
        if clusters and x[i] - x[clusters[-1][-1]] <= 0.03 * span:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    out = []
    for cluster in clusters:
        for rank, i in enumerate(sorted(cluster, key=lambda i: -y[i])):
            out.append((ids[i], 4 if rank == 0 else -10 * rank))
    return out
