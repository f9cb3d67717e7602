"""The quick analysis's activation pass: sparsity and reconstruction over one split of the activation cache.

Rows the cache flagged as massive-activation outliers (norm > outlier_factor x the median) are left out of
the main figures by default: a handful of them can carry most of the variance, and FVU would then measure
little but those rows. FVU with them is always reported as a second figure, with their count.

    from saepipe.analysis.quick import evaluate_activations
    with ActivationCache("data/activations/activations.h5") as cache:
        result = evaluate_activations(sae, cache_batches(cache, "validation", 4096))
    result.figures()  # {"sparsity": {...}, "reconstruction": {...}}
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saepipe.activations.cache import ActivationCache
from saepipe.analysis.reconstruction import ReconstructionAccumulator
from saepipe.analysis.sparsity import SparsityAccumulator, SparsityResult
from saepipe.sae import SparseAutoencoder


@dataclass(frozen=True)
class ActivationEvaluation:
    sparsity: SparsityResult
    reconstruction: dict[str, float | int]
    fvu_with_outliers: float
    outlier_rows: int
    outliers_included: bool

    def figures(self) -> dict[str, dict[str, float | int | bool]]:
        reconstruction: dict[str, float | int | bool] = dict(self.reconstruction)
        reconstruction.update(fvu_with_outliers=self.fvu_with_outliers, outlier_rows=self.outlier_rows,
                              outliers_included=self.outliers_included)
        return {"sparsity": self.sparsity.figures(), "reconstruction": reconstruction}


def cache_batches(cache: ActivationCache, split: str, batch_rows: int, max_tokens: int | None = None,
                  progress: bool = False) -> Iterator[tuple[Tensor, np.ndarray]]:
    """(float32 rows, outlier flags) of the split's first `max_tokens` rows (all: None), outliers included."""
    outlier = cache.column(split, "outlier")
    stop = len(outlier) if max_tokens is None else min(max_tokens, len(outlier))
    with tqdm(total=stop, desc="SAE pass", unit="tok", unit_scale=True, disable=not progress) as bar:
        for start in range(0, stop, batch_rows):
            end = min(start + batch_rows, stop)
            yield cache.read(split, start, end), outlier[start:end]
            bar.update(end - start)


@torch.no_grad()
def evaluate_activations(sae: SparseAutoencoder, batches: Iterable[tuple[Tensor, np.ndarray]],
                         include_outliers: bool = False) -> ActivationEvaluation:
    """Sparsity and reconstruction figures over (raw rows, outlier flags) batches."""
    device = sae.W_enc.device
    sparsity = SparsityAccumulator(sae.d_sae)
    main = ReconstructionAccumulator()
    everything = ReconstructionAccumulator()
    outliers = 0
    for rows, flags in batches:
        x = rows.to(device=device, dtype=torch.float32)
        features = sae.encode(x)
        x_hat = sae.decode(features)
        everything.add(x, x_hat)
        outliers += int(flags.sum())
        if not include_outliers and flags.any():
            keep = torch.from_numpy(~flags).to(device)
            x, features, x_hat = x[keep], features[keep], x_hat[keep]
        if len(x):
            sparsity.add(features)
            main.add(x, x_hat)
    if main.tokens == 0:
        raise ValueError("no rows to evaluate" + ("" if include_outliers else " (all of them are outliers)"))
    return ActivationEvaluation(sparsity=sparsity.result(), reconstruction=main.result(),
                                fvu_with_outliers=float(everything.result()["fvu"]), outlier_rows=outliers,
                                outliers_included=include_outliers)
