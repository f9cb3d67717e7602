"""The sparse training kernels: the compiled CPU selection and its torch twin give the exact batch top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saepipe.sae.cpu_kernels import count_above, gather_marked, keep_top, order_by_column
from saepipe.sae.kernels import batch_top_k, row_top_k


def reference_top(pre: torch.Tensor, k_total: int) -> set[tuple[int, int]]:
    flat = pre.reshape(-1)
    k = min(k_total, int((flat > 0).sum()))
    index = torch.topk(flat, k).indices
    return {(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in index}


@pytest.mark.parametrize("n_latents", [3, 64, 96, 130])
def test_marking_and_gathering_match_numpy_for_any_row_length(n_latents):
    rng = np.random.default_rng(n_latents)
    values = rng.standard_normal((37, n_latents)).astype(np.float32)
    bias = rng.standard_normal(n_latents).astype(np.float32)
    expected = values + bias
    counts, bits = count_above(values, 0.3, bias)
    assert np.array_equal(values, expected)  # the bias went in, in place
    crow, cols, out = gather_marked(values, bits, counts)
    rows, want_cols = np.nonzero(expected > 0.3)
    assert np.array_equal(cols, want_cols) and np.array_equal(out, expected[rows, want_cols])
    assert np.array_equal(np.diff(crow), np.bincount(rows, minlength=37))
    assert np.array_equal(count_above(values, 0.3)[0], counts)  # without bias: values untouched


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hint", [None, 0.2, 5.0])
def test_batch_top_k_is_exact_on_both_paths(seed, hint):
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(48, 80, generator=generator)
    if seed % 2:
        pre = (pre * 2).round() / 2  # many ties at the cut
    k_total = 48 * 4
    expected = reference_top(pre, k_total)
    for path in ("cpu", "torch"):
        x = pre.clone() if path == "cpu" else pre.t().contiguous().t()  # non-contiguous: the torch path
        codes = batch_top_k(x, k_total, hint=hint)
        got = set(zip(codes.rows.tolist(), codes.cols.tolist(), strict=True))
        assert codes.nnz == len(expected) == k_total
        if seed % 2 == 0:  # distinct values: the very same entries
            assert got == expected
        assert torch.equal(codes.values.sort().values, pre[tuple(zip(*expected, strict=True))].sort().values)
        assert torch.equal(pre[codes.rows, codes.cols], codes.values)
        key = codes.rows * pre.shape[1] + codes.cols
        assert bool((key[1:] > key[:-1]).all())  # row-major, latent-sorted
        assert torch.equal(codes.pattern.crow, torch.cat([torch.zeros(1, dtype=torch.long),
                                                          torch.bincount(codes.rows, minlength=48).cumsum(0)]))


def test_batch_top_k_adds_the_bias_in_the_same_pass():
    generator = torch.Generator().manual_seed(0)
    product, bias = torch.randn(32, 64, generator=generator), torch.randn(64, generator=generator)
    expected = batch_top_k(product + bias, 96)
    for hint in (None, 0.5):
        fused = product.clone()
        codes = batch_top_k(fused, 96, hint=hint, bias=bias)
        assert torch.equal(fused, product + bias)
        assert torch.equal(codes.rows, expected.rows) and torch.equal(codes.cols, expected.cols)


def test_batch_top_k_takes_every_positive_entry_when_there_are_too_few():
    pre = -torch.ones(8, 16)
    pre[2, 3], pre[5, 0] = 1.0, 2.0
    codes = batch_top_k(pre, 40, hint=0.5)
    assert codes.nnz == 2 and codes.rows.tolist() == [2, 5] and codes.cols.tolist() == [3, 0]


def test_keep_top_keeps_ties_in_row_major_order():
    crow = np.array([0, 3, 5, 7])
    cols = np.array([0, 1, 2, 0, 3, 1, 2])
    values = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 2.0, 0.5], dtype=np.float32)
    new_crow, new_cols, new_values = keep_top(crow, cols.copy(), values.copy(), 4)
    # 5 and 3 are above the cut (2); two of the three 2s are kept, the first two in row-major order
    assert new_crow.tolist() == [0, 2, 4, 4]
    assert new_cols.tolist() == [1, 2, 0, 3] and new_values.tolist() == [3.0, 2.0, 2.0, 5.0]


def test_order_by_column_is_a_stable_counting_sort():
    cols = np.array([3, 1, 3, 0, 1, 3])
    starts, order = order_by_column(cols, 5)
    assert order.tolist() == np.argsort(cols, kind="stable").tolist()
    assert starts.tolist() == [0, 1, 3, 3, 6, 6]


def test_row_top_k_keeps_k_positive_entries_per_row_sorted_by_latent():
    generator = torch.Generator().manual_seed(1)
    pre = torch.randn(20, 50, generator=generator)
    pre[3] = -1.0  # no positive entry: an empty row
    codes = row_top_k(pre, 5)
    for r in range(20):
        cols = codes.cols[codes.rows == r]
        positive = (pre[r] > 0).sum()
        assert len(cols) == min(5, int(positive))
        assert bool((cols[1:] > cols[:-1]).all())
        if len(cols):
            assert pre[r, cols].min() >= torch.topk(pre[r], 5).values.min()
