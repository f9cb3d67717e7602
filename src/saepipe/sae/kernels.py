"""Sparse kernels for SAE training: only the selected latents cost anything beyond the encoder matmul.

The dense pre-activations are computed once without autograd. The selected entries then re-enter the
graph through `EncodeSelected`, whose backward is a sparse-dense product over just those entries
(not a dense d_in x d_sae one), and are decoded by `DecodeSparse`, an embedding-bag style gather of
decoder rows whose backward touches only the selected rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass(frozen=True)
class SparseCodes:
    """Selected (row, latent) pairs of a batch, sorted by row then latent, with their activations."""

    rows: Tensor  # int64 [nnz]
    cols: Tensor  # int64 [nnz]
    values: Tensor  # float [nnz], differentiable in training
    n_rows: int
    n_latents: int
    _pattern: Pattern | None = field(default=None, repr=False, compare=False)

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.n_rows, self.n_latents, dtype=self.values.dtype, device=self.values.device)
        dense[self.rows, self.cols] = self.values
        return dense

    @property
    def pattern(self) -> Pattern:
        """The shared index structures (built on first use; replace(values=...) keeps them)."""
        if self._pattern is None:
            object.__setattr__(self, "_pattern", Pattern(self.rows, self.cols, self.n_rows, self.n_latents))
        return self._pattern

    def subset(self, keep: Tensor) -> SparseCodes:
        return SparseCodes(self.rows[keep], self.cols[keep], self.values[keep], self.n_rows, self.n_latents)


def sort_indices(index: Tensor) -> Tensor:
    """Ascending integer indices. On the CPU numpy's sort is ~50x faster than torch's threaded one."""
    if index.device.type == "cpu":
        return torch.from_numpy(np.sort(index.numpy()))
    return torch.sort(index).values


def stable_argsort(keys: Tensor) -> Tensor:
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def indices_above(flat: Tensor, threshold: float) -> Tensor:
    """Positions of the entries > threshold. On the CPU numpy's single pass is ~2x faster than torch's."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flat.numpy() > threshold))
    return (flat > threshold).nonzero().squeeze(1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class Pattern:
    """Index structures of a row-sorted sparsity pattern, built once per step and shared by the kernels.

    Row-major CSR serves the decoder's forward; the transpose (latent-major) serves both weight
    gradients, so its sort is paid once, not once per gradient.
    """

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_latents: int):
        self.rows, self.cols, self.n_rows, self.n_latents = rows, cols, n_rows, n_latents
        self.crow = torch._convert_indices_from_coo_to_csr(rows, n_rows)
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    def rowwise(self, values: Tensor) -> Tensor:
        return _csr(self.crow, self.cols, values, (self.n_rows, self.n_latents))

    def transposed(self, values: Tensor) -> Tensor:
        """CSR [n_latents, n_rows] holding `values` (given in row-major order)."""
        if self._t is None:
            order = stable_argsort(self.cols)
            self._t = (order, torch._convert_indices_from_coo_to_csr(self.cols[order], self.n_latents),
                       self.rows[order])
        order, crow, rows = self._t
        return _csr(crow, rows, values[order], (self.n_latents, self.n_rows))


class EncodeSelected(torch.autograd.Function):
    """Selected pre-activations (x - b_dec) @ W_enc + b_enc, differentiable in the parameters.

    Forward returns the values already computed densely; backward builds the parameter gradients from
    the selected entries only: dW_enc = x_c^T S (a sparse-dense product), db_enc = column sums of S, and
    db_dec = -W_enc @ db_enc (the encoder subtracts b_dec from its input).
    """

    @staticmethod
    def forward(ctx, x_centered: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pattern: Pattern,
                values: Tensor) -> Tensor:
        ctx.save_for_backward(x_centered, W_enc)
        ctx.pattern = pattern
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_centered, W_enc = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, pattern.cols, grad)
        grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = (pattern.transposed(grad) @ x_centered).t()
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_b_dec, grad_W_enc, grad_b_enc if ctx.needs_input_grad[3] else None, None, None


class DecodeSparse(torch.autograd.Function):
    """sum over selected latents of value * W_dec[latent], per row (no decoder bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pattern: Pattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return torch.nn.functional.embedding_bag(pattern.cols, W_dec, pattern.crow[:-1], mode="sum",
                                                 per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            sampled = pattern.rowwise(torch.zeros_like(values))
            grad_values = torch.sparse.sampled_addmm(sampled, grad_out.contiguous(), W_dec.t()).values()
        if ctx.needs_input_grad[1]:
            grad_W_dec = pattern.transposed(values) @ grad_out
        return grad_values, grad_W_dec, None


def encode_selected(x_centered: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, codes: SparseCodes
                    ) -> Tensor:
    """The selected entries' pre-activations (codes.values), now differentiable in W_enc, b_enc, b_dec.

    `x_centered` = x - b_dec, computed once by the caller (without autograd: b_dec's gradient through
    the encoder is formed here).
    """
    return EncodeSelected.apply(x_centered, b_dec, W_enc, b_enc, codes.pattern, codes.values)


def decode_sparse(codes: SparseCodes, W_dec: Tensor) -> Tensor:
    if codes.nnz == 0:
        return torch.zeros(codes.n_rows, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return DecodeSparse.apply(codes.values, W_dec, codes.pattern)


def flat_to_codes(flat_index: Tensor, values: Tensor, n_rows: int, n_latents: int) -> SparseCodes:
    """Codes from flat (row * n_latents + latent) indices, reordered row-major."""
    order = stable_argsort(flat_index)
    flat_index = flat_index[order]
    return SparseCodes(flat_index // n_latents, flat_index % n_latents, values[order], n_rows, n_latents)


def batch_top_k(pre: Tensor, k_total: int, hint: float | None = None) -> SparseCodes:
    """The k_total largest positive entries of `pre` over the whole batch, exactly.

    A full top-k over rows x latents values costs as much as the encoder matmul, so it is found among
    candidates above a threshold: `hint` (a threshold believed a little below the k_total-th value, e.g.
    the running estimate from earlier steps) or else a quantile of a strided sample. If too few entries
    pass, the threshold is lowered until enough do; the result is the same as a full top-k.
    """
    n_rows, n_latents = pre.shape
    flat = pre.reshape(-1)
    k_total = min(k_total, flat.numel())
    candidates = indices_above(flat, hint) if hint is not None and hint > 0 else None
    if candidates is None or candidates.numel() < k_total:
        stride = 17 if n_latents % 17 else 19  # co-prime with the row length: every latent gets sampled
        sample = flat[::stride]
        want = min(sample.numel(), int(k_total / stride * 1.5) + 16)
        threshold = max(float(torch.topk(sample, want, sorted=False).values.min()), 0.0)
        candidates = indices_above(flat, threshold)
        if candidates.numel() < k_total:
            candidates = indices_above(flat, 0.0)
    values = flat[candidates]
    if candidates.numel() > k_total:
        top = torch.topk(values, k_total, sorted=False).indices
        candidates, values = candidates[top], values[top]
    return flat_to_codes(candidates, values, n_rows, n_latents)


def row_top_k(pre: Tensor, k: int) -> SparseCodes:
    """The k largest positive entries of each row."""
    n_rows, n_latents = pre.shape
    values, cols = torch.topk(pre, min(k, n_latents), dim=1, sorted=False)
    rows = torch.arange(n_rows, device=pre.device).repeat_interleave(values.shape[1])
    flat = rows * n_latents + cols.reshape(-1)
    values = values.reshape(-1)
    positive = values > 0
    return flat_to_codes(flat[positive], values[positive], n_rows, n_latents)
