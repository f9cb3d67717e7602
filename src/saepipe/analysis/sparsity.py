"""How sparse an SAE's codes are: L0 per token, per-feature firing density, dead features.

A feature *fires* on a token when its activation is > 0 (every architecture here outputs activations >= 0;
SAELens counts L0 the same way). Over N evaluated tokens:

    L0(token)         number of features firing on the token; reported as mean, median and p90 over tokens
    density(feature)  fraction of the N tokens on which the feature fires
    dead              density == 0: never fires on the evaluated tokens (ids are kept)
    alive fraction    1 - dead / d_sae

One call on a loaded SAE and a batch of raw activations:

    from saepipe.analysis.sparsity import sparsity_metrics, mean_l0
    result = sparsity_metrics(sae, x)         # SparsityResult: .figures(), .density, .dead_ids
    l0 = mean_l0(sae, x)

Streaming over many batches: `acc = SparsityAccumulator(sae.d_sae)`, `acc.add(sae.encode(x))` per batch,
`acc.result()`. Memory is O(d_sae): per-token L0 is kept as a histogram over 0..d_sae, so the median and
p90 are exact (numpy's default linear interpolation) without storing a value per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saepipe.sae import SparseAutoencoder

DENSITY_THRESHOLDS = (0.01, 0.1)
"""Features firing on more than these fractions of tokens are counted (dense features are suspect)."""
HISTOGRAM_BIN_WIDTH = 0.25
"""Width of the log10-density histogram's bins, in decades."""


@dataclass(frozen=True)
class SparsityResult:
    tokens: int
    l0_mean: float
    l0_median: float
    l0_p90: float
    density: np.ndarray  # float64 [d_sae]: fraction of tokens each feature fires on

    @property
    def d_sae(self) -> int:
        return len(self.density)

    @property
    def dead_ids(self) -> np.ndarray:
        return np.flatnonzero(self.density == 0)

    def figures(self) -> dict[str, float | int]:
        dead = len(self.dead_ids)
        figures: dict[str, float | int] = {
            "tokens": self.tokens,
            "l0_mean": self.l0_mean,
            "l0_median": self.l0_median,
            "l0_p90": self.l0_p90,
            "l0_fraction": self.l0_mean / self.d_sae,
            "alive_fraction": 1.0 - dead / self.d_sae,
            "dead_features": dead,
            "dead_feature_percentage": 100.0 * dead / self.d_sae,
        }
        for threshold in DENSITY_THRESHOLDS:
            figures[f"features_firing_over_{round(100 * threshold)}pct"] = int((self.density > threshold).sum())
        return figures


class SparsityAccumulator:
    """Fire counts per feature and a histogram of per-token L0, added to batch by batch."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.tokens = 0
        self.fire_counts = np.zeros(d_sae, np.int64)
        self.l0_counts = np.zeros(d_sae + 1, np.int64)  # l0_counts[k]: tokens with exactly k features firing

    @torch.no_grad()
    def add(self, features: Tensor) -> None:
        """Feature activations [tokens, d_sae] of one batch."""
        if features.ndim != 2 or features.shape[1] != self.d_sae:
            raise ValueError(f"features must be [tokens, {self.d_sae}], got {tuple(features.shape)}")
        fires = features > 0
        self.tokens += features.shape[0]
        self.fire_counts += fires.sum(0).cpu().numpy()
        l0 = fires.sum(1)
        self.l0_counts += torch.bincount(l0, minlength=self.d_sae + 1).cpu().numpy()

    def result(self) -> SparsityResult:
        if self.tokens == 0:
            raise ValueError("no tokens were added")
        l0_values = np.arange(self.d_sae + 1)
        return SparsityResult(
            tokens=self.tokens,
            l0_mean=float((l0_values * self.l0_counts).sum() / self.tokens),
            l0_median=histogram_quantile(self.l0_counts, 0.5),
            l0_p90=histogram_quantile(self.l0_counts, 0.9),
            density=self.fire_counts / self.tokens,
        )


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """The q-quantile of integer values given as counts[value], interpolated like numpy.quantile (linear)."""
    n = int(counts.sum())
    rank = (n - 1) * q
    cumulative = np.cumsum(counts)
    low, high = math.floor(rank), math.ceil(rank)
    value_low = int(np.searchsorted(cumulative, low, side="right"))  # the sorted value at index `low`
    value_high = int(np.searchsorted(cumulative, high, side="right"))
    return value_low + (rank - low) * (value_high - value_low)


@dataclass(frozen=True)
class DensityHistogram:
    """Counts of alive features per log10(density) bin; dead features (log10 0 = -inf) are counted apart."""

    edges: np.ndarray  # float64 [bins + 1], from the lowest possible density (1 / tokens) to 1 (= 10^0)
    counts: np.ndarray  # int64 [bins]
    dead: int

    def rows(self) -> list[dict[str, float | int]]:
        """One record per bin (a DVC plot's data: x = log10_density at the bin's centre, y = features)."""
        return [
            {"log10_density": round(float(lo + hi) / 2, 6), "bin_low": round(float(lo), 6),
             "bin_high": round(float(hi), 6), "features": int(c)}
            for lo, hi, c in zip(self.edges[:-1], self.edges[1:], self.counts, strict=True)
        ]


def log10_density_histogram(density: np.ndarray, tokens: int,
                            bin_width: float = HISTOGRAM_BIN_WIDTH) -> DensityHistogram:
    """Histogram of log10(density) over alive features, in `bin_width`-decade bins covering [log10(1/tokens), 0]."""
    lowest = -math.log10(max(tokens, 1))
    start = min(math.floor(lowest / bin_width) * bin_width, -bin_width)
    bins = round(-start / bin_width)
    edges = np.linspace(start, 0.0, bins + 1)
    alive = density[density > 0]
    counts, _ = np.histogram(np.log10(alive), bins=edges)
    return DensityHistogram(edges=edges, counts=counts.astype(np.int64), dead=int((density == 0).sum()))


# ---- one call on a loaded SAE and a batch of raw activations ------------------------------------------------
@torch.no_grad()
def sparsity_metrics(sae: SparseAutoencoder, x: Tensor) -> SparsityResult:
    """Sparsity of `sae`'s codes on raw activations x [tokens, d_in]."""
    acc = SparsityAccumulator(sae.d_sae)
    acc.add(sae.encode(_on(sae, x)))
    return acc.result()


@torch.no_grad()
def mean_l0(sae: SparseAutoencoder, x: Tensor) -> float:
    """Mean number of features firing per token on raw activations x [tokens, d_in]."""
    return float((sae.encode(_on(sae, x)) > 0).sum(1).double().mean())


def _on(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    return x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
