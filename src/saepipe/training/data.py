"""Training data from the activation cache: rows in memory at their storage dtype, batches in float32.

Keeping the rows at their storage dtype (float16 by default) holds memory at the size of the cache;
each batch is converted to float32 and scaled to the normalised space on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saepipe.activations.cache import ActivationCache, check_finite_rows, stored_tensor

READ_BLOCK_ROWS = 65536
TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ActivationData:
    train: Tensor  # [rows held by this process, d_in], storage dtype
    validation: Tensor
    scale: float  # multiply raw activations by this to train (1.0 when not normalising)
    attrs: dict[str, Any]  # the cache's attributes: model, hook, tokenizer, windows ...
    dropped_outliers: dict[str, int]
    train_ids: np.ndarray | None = None
    """Under data parallelism, the (sorted) global training-row ids this process holds, `train`'s rows in
    that order; None when it holds them all."""
    train_total: int | None = None
    """Training rows over all processes (None: `train`'s own count)."""

    @property
    def d_in(self) -> int:
        return int(self.train.shape[1])

    @property
    def n_train(self) -> int:
        """Training rows of the whole run (every process's batches are cut from this one index space)."""
        return int(self.train.shape[0]) if self.train_total is None else self.train_total

    def local_index(self, global_ids: Tensor) -> Tensor:
        """Positions in `train` of global training-row ids this process holds."""
        if self.train_ids is None:
            return global_ids
        return torch.from_numpy(np.searchsorted(self.train_ids, global_ids.numpy()))


def _split_keep(cache: ActivationCache, split: str, include_outliers: bool, max_rows: int | None, seed: int
                ) -> tuple[np.ndarray, int]:
    """The split's rows that train (outliers left out unless asked for); with `max_rows`, a seeded random
    subset (the file is ordered by window length, so its first rows would over-represent long documents)."""
    outlier = cache.column(split, "outlier")
    keep = np.ones(len(outlier), bool) if include_outliers else ~outlier
    if max_rows is not None and keep.sum() > max_rows:
        chosen = np.random.default_rng(seed).choice(np.flatnonzero(keep), size=max_rows, replace=False)
        keep = np.zeros_like(keep)
        keep[chosen] = True
    return keep, 0 if include_outliers else int(outlier.sum())


def _read_rows(cache: ActivationCache, split: str, keep: np.ndarray) -> Tensor:
    """The rows under `keep` at storage dtype, filled in place block by block (concatenating blocks would
    hold the split twice at its peak)."""
    stored = cache.dataset(split)
    data = torch.empty(int(keep.sum()), cache.d_model, dtype=TORCH_STORAGE[cache.storage_dtype])
    filled = 0
    for start in range(0, stored.shape[0], READ_BLOCK_ROWS):
        mask = keep[start : start + READ_BLOCK_ROWS]
        if mask.any():
            block = stored_tensor(cache.read_stored(split, start, start + len(mask))[mask], cache.storage_dtype)
            check_finite_rows(block, cache.path, split, np.flatnonzero(mask) + start)
            data[filled : filled + len(block)] = block
            filled += len(block)
    return data


def load_activation_data(path: str | Path, *, include_outliers: bool, max_train_rows: int | None,
                         normalize: bool, seed: int = 0, hook: str | None = None,
                         shard: Callable[[int], np.ndarray] | None = None, validation: bool = True
                         ) -> ActivationData:
    """Both splits of the cache (`hook`'s, for a cache of several); outliers left out unless asked for,
    the scale from non-outlier rows. With `shard` (training-row count -> the sorted ids this process
    needs), only those training rows are read; `validation=False` reads no validation rows."""
    with ActivationCache(path, hook=hook) as cache:
        keep, dropped_train = _split_keep(cache, "train", include_outliers, max_train_rows, seed)
        total, ids = int(keep.sum()), None
        if shard is not None:
            ids = shard(total)
            mine = np.zeros_like(keep)
            mine[np.flatnonzero(keep)[ids]] = True
            keep = mine
        train = _read_rows(cache, "train", keep)
        val_keep, dropped_val = _split_keep(cache, "validation", include_outliers, None, seed)
        validation_rows = _read_rows(cache, "validation", val_keep if validation else np.zeros_like(val_keep))
        mean_norm = float(cache.split_attrs("train")["mean_norm"])
        attrs = dict(cache.attrs)
    scale = math.sqrt(train.shape[1]) / mean_norm if normalize and mean_norm > 0 else 1.0
    return ActivationData(train, validation_rows, scale, attrs, {"train": dropped_train, "validation": dropped_val},
                          train_ids=ids, train_total=total if shard is not None else None)


def epoch_order(n_rows: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)


def iter_batches(rows: Tensor, order: Tensor | None, batch_size: int, scale: float, device: torch.device
                 ) -> Iterator[Tensor]:
    """float32 batches of `rows` (in `order` when given), scaled into the training space."""
    n = rows.shape[0]
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        yield rows[index].to(device=device, dtype=torch.float32, non_blocking=True) * scale


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` (robust to outliers)."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        distance = torch.linalg.vector_norm(points - median, dim=1).clamp_min(1e-8)
        weights = 1.0 / distance
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if torch.linalg.vector_norm(new - median) <= tol * torch.linalg.vector_norm(median).clamp_min(1e-12):
            median = new
            break
        median = new
    return median.float()
