"""The sparse training kernels: the compiled CPU paths and their torch twins give the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saepipe.kernels import (
    batch_sums,
    batch_top_k,
    csr_matmul,
    exact_cut,
    gather_columns,
    row_top_k,
    sampled_dots,
    sparse,
)
from saepipe.kernels.cpu import count_above, gather_marked, keep_top, order_by_column
from saepipe.sae.base import decoded_mse


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


def random_csr(n_rows: int, n_cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=generator) < 0.15
    mask[3] = False  # an empty row
    mask[5, :7] = True  # a row with more than four entries
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=n_rows).cumsum(0)])
    return crow, cols, torch.randn(cols.numel(), generator=generator)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_csr_matmul_and_sampled_dots_match_dense_products(transpose, compiled, monkeypatch):
    if not compiled:  # the torch operators a GPU runs
        monkeypatch.setattr(sparse, "compiled", lambda *tensors: False)
    crow, cols, values = random_csr(23, 37, seed=2)
    rows = torch.repeat_interleave(torch.arange(23), crow.diff())
    dense_matrix = torch.zeros(23, 37)
    dense_matrix[rows, cols] = values
    right = torch.randn(37, 9, generator=torch.Generator().manual_seed(3))
    want = dense_matrix @ right
    got = csr_matmul(crow, cols, values, right, transpose=transpose)
    torch.testing.assert_close(got, want.t() if transpose else want, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous()
    order = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(8))  # values kept elsewhere
    stored = torch.empty_like(values)
    stored[order] = values
    torch.testing.assert_close(csr_matmul(crow, cols, stored, right, transpose=transpose, order=order), got)
    left = torch.randn(23, 9, generator=torch.Generator().manual_seed(4))
    want_dots = (left[rows] * right[cols]).sum(1)  # left row r . right row c
    torch.testing.assert_close(sampled_dots(crow, cols, left, right), want_dots, atol=1e-5, rtol=1e-5)


def test_gather_columns_and_batch_sums():
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(10, 30, generator=generator)
    ids = torch.tensor([0, 7, 29, 3])
    assert torch.equal(gather_columns(matrix, ids), matrix[:, ids])
    decoded, bias, x = (torch.randn(12, 8, generator=generator), torch.randn(8, generator=generator),
                        torch.randn(12, 8, generator=generator))
    for args in ((decoded, bias, x), (decoded.double(), bias.double(), x.double())):
        sums = batch_sums(*args)
        x_hat = args[0] + args[1]
        residual = args[2] - x_hat
        torch.testing.assert_close(sums.x_hat, x_hat)
        torch.testing.assert_close(sums.residual, residual)
        want_rows = torch.stack([(args[2] * args[2]).sum(1), (args[2] * x_hat).sum(1), (x_hat * x_hat).sum(1),
                                 (residual * residual).sum(1)], dim=1)
        torch.testing.assert_close(sums.rows, want_rows)
        torch.testing.assert_close(sums.residual_sum, residual.sum(0))
        torch.testing.assert_close(sums.x_sum, args[2].sum(0))


def test_decoded_mse_gradients_match_autograd():
    generator = torch.Generator().manual_seed(6)
    decoded = torch.randn(12, 8, generator=generator, requires_grad=True)
    bias = torch.randn(8, generator=generator, requires_grad=True)
    x = torch.randn(12, 8, generator=generator)
    x_hat, loss, _ = decoded_mse(decoded, bias, x)
    (loss * 3 + (x_hat * x).sum()).backward()  # through the loss and through x_hat itself
    reference_decoded = decoded.detach().clone().requires_grad_()
    reference_bias = bias.detach().clone().requires_grad_()
    reference_x_hat = reference_decoded + reference_bias
    (torch.nn.functional.mse_loss(reference_x_hat, x) * 3 + (reference_x_hat * x).sum()).backward()
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(reference_x_hat, x).detach())
    torch.testing.assert_close(decoded.grad, reference_decoded.grad)
    torch.testing.assert_close(bias.grad, reference_bias.grad)


@pytest.mark.parametrize(("n_rows", "d", "k", "batch"), [(1000, 300, 5, 128), (777, 64, 3, 100), (4096, 96, 8, 4096)])
def test_exact_cut_keeps_k_per_row_over_all_batches(n_rows, d, k, batch):
    """The threshold leaves exactly k x rows entries of the whole sample above it, though no batch alone
    keeps k per row: a batch cut or a mean of batch cuts would not."""
    torch.manual_seed(n_rows)
    pre = torch.randn(n_rows, d) - 1.0
    pre[: n_rows // 3] += 0.5  # batches differ: the first ones hold more of the large values
    threshold, l0 = exact_cut((pre[i : i + batch] for i in range(0, n_rows, batch)), k, n_rows)
    assert int((pre > threshold).sum()) == k * n_rows
    assert l0 == k
    ranked = pre.flatten().sort(descending=True).values
    assert ranked[k * n_rows] < threshold < ranked[k * n_rows - 1]


def test_exact_cut_keeps_every_positive_entry_when_there_are_too_few():
    pre = torch.full((50, 20), -1.0)
    pre[torch.arange(50), torch.arange(50) % 20] = torch.rand(50) + 0.1  # one positive entry per row
    threshold, l0 = exact_cut(iter([pre[:16], pre[16:]]), 3, 50)
    assert threshold == 0.0 and l0 == 1.0
