"""Compiled CPU loops (numba) for the training steps torch has no fast CPU operator for.

- Batch top-k: finding the entries above a threshold in a [batch, d_sae] matrix costs torch or numpy
  several full passes (compare, nonzero, gather: ~15 ms at 4096 x 4608 on two cores, a quarter of the
  encoder matmul); here one vectorised pass adds the bias, marks a bit per entry and counts, and a
  second visits only the set bits. Sorting the kept entries by latent is a counting sort.
- Sparse-dense products (CSR x dense, dot products sampled at a pattern): the same memory-bound gathers
  torch runs, four rows per sweep and without torch's zero-fill and copy of the output (~20% faster).
- `reconstruct`: x_hat, the residual and every sum the loss and the metrics need, in one pass.

Every function takes and returns numpy arrays; the torch-facing wrappers live in `kernels.sparse` and
`kernels.select`. The first call compiles (cached in __pycache__; about 10 s for all of them).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_OPTIONS = {"cache": True, "boundscheck": False, "nogil": True}


@njit(parallel=True, **_OPTIONS)
def _add_bias_mark_above(values, bias, threshold, bits, counts):  # pragma: no cover - compiled
    n_rows, n_cols = values.shape
    for r in prange(n_rows):
        total = 0
        for w in range(n_cols // 64):  # whole 64-entry words: a branch-free loop the compiler vectorises
            word = np.uint64(0)
            for b in range(64):
                j = w * 64 + b
                v = values[r, j] + bias[j]
                values[r, j] = v
                above = v > threshold
                word |= np.uint64(above) << np.uint64(b)
                total += above
            bits[r, w] = word
        word = np.uint64(0)
        for j in range(n_cols - n_cols % 64, n_cols):  # the partial last word
            v = values[r, j] + bias[j]
            values[r, j] = v
            above = v > threshold
            word |= np.uint64(above) << np.uint64(j % 64)
            total += above
        if n_cols % 64:
            bits[r, n_cols // 64] = word
        counts[r] = total


@njit(parallel=True, **_OPTIONS)
def _mark_above(values, threshold, bits, counts):  # pragma: no cover - compiled
    n_rows, n_cols = values.shape
    for r in prange(n_rows):
        total = 0
        for w in range(n_cols // 64):
            word = np.uint64(0)
            for b in range(64):
                above = values[r, w * 64 + b] > threshold
                word |= np.uint64(above) << np.uint64(b)
                total += above
            bits[r, w] = word
        word = np.uint64(0)
        for j in range(n_cols - n_cols % 64, n_cols):
            above = values[r, j] > threshold
            word |= np.uint64(above) << np.uint64(j % 64)
            total += above
        if n_cols % 64:
            bits[r, n_cols // 64] = word
        counts[r] = total


@njit(**_OPTIONS)
def _lowest_bit(word):  # pragma: no cover - compiled
    """Index of the lowest set bit of a non-zero 64-bit word."""
    low = word & (~word + np.uint64(1))
    index = 0
    for shift in (32, 16, 8, 4, 2, 1):
        if low >= (np.uint64(1) << np.uint64(shift)):
            index += shift
            low >>= np.uint64(shift)
    return index


@njit(parallel=True, **_OPTIONS)
def _gather_marked(values, bits, offsets, cols, out):  # pragma: no cover - compiled
    for r in prange(values.shape[0]):
        o = offsets[r]
        for w in range(bits.shape[1]):
            word = bits[r, w]
            while word != 0:
                j = w * 64 + _lowest_bit(word)
                cols[o] = j
                out[o] = values[r, j]
                o += 1
                word &= word - np.uint64(1)


@njit(**_OPTIONS)
def _order_by_column(cols, n_cols):  # pragma: no cover - compiled
    starts = np.zeros(n_cols + 1, np.int64)
    for i in range(cols.size):
        starts[cols[i] + 1] += 1
    for c in range(n_cols):
        starts[c + 1] += starts[c]
    fill = starts[:-1].copy()
    order = np.empty(cols.size, np.int64)
    for i in range(cols.size):
        c = cols[i]
        order[fill[c]] = i
        fill[c] += 1
    return starts, order


@njit(parallel=True, **_OPTIONS)
def _keep_above_cut(crow, cols, values, cut, k_total, new_crow, new_cols, new_values):  # pragma: no cover
    n_rows = crow.size - 1
    above = np.zeros(n_rows, np.int64)
    at_cut = np.zeros(n_rows, np.int64)
    for r in prange(n_rows):
        for i in range(crow[r], crow[r + 1]):
            above[r] += values[i] > cut
            at_cut[r] += values[i] == cut
    ties_left = k_total - above.sum()  # entries equal to the cut, kept in row-major order
    new_crow[0] = 0
    for r in range(n_rows):
        take = min(ties_left, at_cut[r])
        at_cut[r] = take
        ties_left -= take
        new_crow[r + 1] = new_crow[r] + above[r] + take
    for r in prange(n_rows):
        o = new_crow[r]
        ties = at_cut[r]
        for i in range(crow[r], crow[r + 1]):
            v = values[i]
            keep = v > cut
            if v == cut and ties > 0:
                keep = True
                ties -= 1
            if keep:
                new_cols[o] = cols[i]
                new_values[o] = v
                o += 1


@njit(fastmath=True, **_OPTIONS)
def _csr_row_times_dense(crow, cols, values, order, dense, r, acc):  # pragma: no cover - compiled
    acc[:] = 0
    i, end = crow[r], crow[r + 1]
    indirect = order.size > 0  # values[order[i]]: entries stored in another order (no permuted copy)
    while i + 4 <= end:  # four dense rows per sweep of the accumulator
        c0, c1, c2, c3 = cols[i], cols[i + 1], cols[i + 2], cols[i + 3]
        if indirect:
            v0, v1, v2, v3 = values[order[i]], values[order[i + 1]], values[order[i + 2]], values[order[i + 3]]
        else:
            v0, v1, v2, v3 = values[i], values[i + 1], values[i + 2], values[i + 3]
        for j in range(acc.size):
            acc[j] += v0 * dense[c0, j] + v1 * dense[c1, j] + v2 * dense[c2, j] + v3 * dense[c3, j]
        i += 4
    while i < end:
        c, v = cols[i], values[order[i]] if indirect else values[i]
        for j in range(acc.size):
            acc[j] += v * dense[c, j]
        i += 1


@njit(parallel=True, fastmath=True, **_OPTIONS)
def _csr_matmul(crow, cols, values, order, dense, out):  # pragma: no cover - compiled
    for r in prange(crow.size - 1):
        _csr_row_times_dense(crow, cols, values, order, dense, r, out[r])


_BLOCK = 16  # output rows per block of the transposed product: 64 bytes of each output column


@njit(parallel=True, fastmath=True, **_OPTIONS)
def _csr_matmul_transposed(crow, cols, values, order, dense, out):  # pragma: no cover - compiled
    n_rows, d = crow.size - 1, dense.shape[1]
    for block in prange((n_rows + _BLOCK - 1) // _BLOCK):
        r0 = block * _BLOCK
        r1 = min(r0 + _BLOCK, n_rows)
        acc = np.empty((_BLOCK, d), dense.dtype)
        for r in range(r0, r1):
            _csr_row_times_dense(crow, cols, values, order, dense, r, acc[r - r0])
        for j in range(d):
            for r in range(r0, r1):
                out[j, r] = acc[r - r0, j]


@njit(parallel=True, fastmath=True, **_OPTIONS)
def _reconstruct(decoded, bias, x, x_hat, residual, rows, column_sums):  # pragma: no cover - compiled
    n_rows, d = x.shape
    n_chunks = column_sums.shape[0]
    per_chunk = (n_rows + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        residual_sum = column_sums[chunk, 0]
        x_sum = column_sums[chunk, 1]
        residual_sum[:] = 0
        x_sum[:] = 0
        for r in range(chunk * per_chunk, min(n_rows, (chunk + 1) * per_chunk)):
            x_sq = x_dot = x_hat_sq = error_sq = x.dtype.type(0)
            for j in range(d):
                h = decoded[r, j] + bias[j]
                e = x[r, j] - h
                x_hat[r, j] = h
                residual[r, j] = e
                x_sq += x[r, j] * x[r, j]
                x_dot += x[r, j] * h
                x_hat_sq += h * h
                error_sq += e * e
                residual_sum[j] += e
                x_sum[j] += x[r, j]
            rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3] = x_sq, x_dot, x_hat_sq, error_sq


@njit(parallel=True, fastmath=True, **_OPTIONS)
def _sampled_dots(crow, cols, left, right, out):  # pragma: no cover - compiled
    d = left.shape[1]
    zero = left.dtype.type(0)
    for r in prange(crow.size - 1):
        i, end = crow[r], crow[r + 1]
        while i + 4 <= end:  # left[r] is read once per four rows of `right`
            c0, c1, c2, c3 = cols[i], cols[i + 1], cols[i + 2], cols[i + 3]
            s0 = s1 = s2 = s3 = zero
            for j in range(d):
                x = left[r, j]
                s0 += x * right[c0, j]
                s1 += x * right[c1, j]
                s2 += x * right[c2, j]
                s3 += x * right[c3, j]
            out[i], out[i + 1], out[i + 2], out[i + 3] = s0, s1, s2, s3
            i += 4
        while i < end:
            c = cols[i]
            s = zero
            for j in range(d):
                s += left[r, j] * right[c, j]
            out[i] = s
            i += 1


@njit(parallel=True, **_OPTIONS)
def _gather_columns(matrix, ids, out):  # pragma: no cover - compiled
    for r in prange(matrix.shape[0]):
        for i in range(ids.size):
            out[r, i] = matrix[r, ids[i]]


def _threads() -> None:
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def count_above(values: np.ndarray, threshold: float, bias: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(per-row counts of entries > threshold, a bit mask [n_rows, ceil(n_cols / 64)] marking them).

    `values` is a C-contiguous float matrix; with `bias`, it is first added to every row of `values`,
    in place, in the same pass.
    """
    _threads()
    n_rows, n_cols = values.shape
    bits = np.empty((n_rows, -(-n_cols // 64)), dtype=np.uint64)
    counts = np.empty(n_rows, dtype=np.int64)
    threshold = values.dtype.type(threshold)
    if bias is None:
        _mark_above(values, threshold, bits, counts)
    else:
        _add_bias_mark_above(values, bias.astype(values.dtype, copy=False), threshold, bits, counts)
    return counts, bits


def gather_marked(values: np.ndarray, bits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
    """(row offsets [n_rows + 1], column of each marked entry, its value), row-major order."""
    _threads()
    offsets = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    cols = np.empty(offsets[-1], dtype=np.int64)
    out = np.empty(offsets[-1], dtype=values.dtype)
    _gather_marked(values, bits, offsets, cols, out)
    return offsets, cols, out


def order_by_column(cols: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(column offsets [n_cols + 1], a stable permutation that sorts `cols`) by counting sort."""
    return _order_by_column(cols, n_cols)


def keep_top(crow: np.ndarray, cols: np.ndarray, values: np.ndarray, k_total: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k_total largest of row-major entries (ties at the cut in row-major order), order kept."""
    if values.size <= k_total:
        return crow, cols, values
    cut = np.partition(values, values.size - k_total)[values.size - k_total]  # the k_total-th largest
    new_crow, new_cols, new_values = np.empty_like(crow), np.empty(k_total, cols.dtype), np.empty(k_total, values.dtype)
    _keep_above_cut(crow, cols, values, cut, k_total, new_crow, new_cols, new_values)
    return new_crow, new_cols, new_values


def csr_matmul(crow: np.ndarray, cols: np.ndarray, values: np.ndarray, dense: np.ndarray,
               transpose: bool = False, order: np.ndarray | None = None) -> np.ndarray:
    """S @ dense for S in CSR form (row offsets, columns, values): row r sums values x rows of `dense`.

    With `transpose`, (S @ dense).T, C-contiguous, written directly (no separate transposing copy).
    With `order`, entry i's value is values[order[i]] (values kept in another order, not permuted first).
    """
    _threads()
    n_rows, d = crow.size - 1, dense.shape[1]
    out = np.empty((d, n_rows) if transpose else (n_rows, d), dtype=dense.dtype)
    order = np.empty(0, np.int64) if order is None else order
    (_csr_matmul_transposed if transpose else _csr_matmul)(crow, cols, values, order, dense, out)
    return out


def reconstruct(decoded: np.ndarray, bias: np.ndarray, x: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_hat = decoded + bias and x - x_hat, with per-row sums [n, 4] (|x|^2, x . x_hat, |x_hat|^2,
    |x - x_hat|^2) and column sums [2, d] (of x - x_hat, of x): one pass over the batch."""
    _threads()
    x_hat, residual = np.empty_like(x), np.empty_like(x)
    rows = np.empty((x.shape[0], 4), dtype=x.dtype)
    n_chunks = max(1, min(numba.get_num_threads(), x.shape[0]))
    partial = np.empty((n_chunks, 2, x.shape[1]), dtype=x.dtype)  # per-thread column sums, then added
    _reconstruct(decoded, bias, x, x_hat, residual, rows, partial)
    return x_hat, residual, rows, partial.sum(0)


def sampled_dots(crow: np.ndarray, cols: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left[r] . right[c] for every entry (r, c) of a CSR pattern, in its order."""
    _threads()
    out = np.empty(cols.size, dtype=left.dtype)
    _sampled_dots(crow, cols, left, right, out)
    return out


def gather_columns(matrix: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """matrix[:, ids] as a new C-contiguous array (torch's strided gather is ~3x slower)."""
    _threads()
    out = np.empty((matrix.shape[0], ids.size), dtype=matrix.dtype)
    _gather_columns(matrix, ids, out)
    return out
