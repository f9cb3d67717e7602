"""Compiled loops (numba) that turn a token-major CSR into a feature-major index sorted by activation.

The activation DB's reverse index is built one block of features at a time: each block is a pass over
the CSR that drops every entry of the block's features into its preallocated slot (a counting-sort
scatter, rows stay ascending within a feature), then each feature's slice is sorted by activation,
descending (stable, so ties keep row order). Both are O(nnz) per pass apart from the per-feature sorts;
numpy's global argsort of tens of millions of entries would cost several times the SAE's own encode.
Numpy arrays in, numpy arrays out; the first call compiles (cached in __pycache__).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTIONS = {"cache": True, "boundscheck": False, "nogil": True}


@njit(**_OPTIONS)
def scatter_block(indptr, first_row, features, values, f0, f1, fill, out_rows, out_values):  # pragma: no cover
    """Entries of features [f0, f1) of CSR rows `first_row + i` -> out_*[fill[f - f0]++] (block-relative)."""
    base = indptr[0]
    for r in range(len(indptr) - 1):
        row = first_row + r
        for i in range(indptr[r] - base, indptr[r + 1] - base):
            f = features[i]
            if f0 <= f < f1:
                slot = fill[f - f0]
                out_rows[slot] = row
                out_values[slot] = values[i]
                fill[f - f0] = slot + 1


@njit(parallel=True, **_OPTIONS)
def sort_segments(indptr, rows, values, levels, sums, maxima, quantiles):  # pragma: no cover - compiled
    """Sort each segment [indptr[f], indptr[f+1]) by value, descending; per segment its sum, max and the
    nearest-rank quantiles at `levels` (ascending rank floor(q * (n - 1)), numpy's method="lower")."""
    for f in prange(len(indptr) - 1):
        a, b = indptr[f], indptr[f + 1]
        n = b - a
        if n == 0:
            continue
        if n > 1:
            order = np.argsort(-values[a:b], kind="mergesort")
            rows[a:b] = rows[a:b][order]
            values[a:b] = values[a:b][order]
        total = 0.0
        for i in range(a, b):
            total += values[i]
        sums[f] = total
        maxima[f] = values[a]
        for j in range(len(levels)):
            rank = int(np.floor(levels[j] * (n - 1)))
            quantiles[f, j] = values[b - 1 - rank]
