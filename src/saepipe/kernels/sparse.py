"""Sparse products for SAE training: only the selected latents cost anything beyond the encoder matmul.

The dense pre-activations are computed once without autograd. The selected entries then re-enter the
graph through `EncodeSelected`, whose backward is a sparse-dense product over just those entries
(not a dense d_in x d_sae one), and are decoded by `DecodeSparse`, a gather of decoder rows whose
backward touches only the selected rows. Each operation runs the compiled loops of `kernels.cpu` on
CPU float tensors and torch operators elsewhere (a GPU); tests check that the two agree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from saepipe.kernels import cpu

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


def on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def compiled(*tensors: Tensor) -> bool:
    """Whether the compiled CPU kernels take these: CPU, one float dtype (float32 or float64).

    Every kernel module asks through this one name, so tests can send all of them down the torch path.
    """
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(on_cpu(t) and t.dtype == dtype for t in tensors)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row offsets [n_rows + 1] of entries sorted by row."""
    offsets = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=offsets[1:])
    return offsets


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def csr_matmul(crow: Tensor, cols: Tensor, values: Tensor, dense: Tensor, transpose: bool = False,
               order: Tensor | None = None) -> Tensor:
    """S @ dense for a CSR matrix S with these row offsets, columns and values (S has dense.shape[0] columns);
    with `transpose`, its contiguous transpose; with `order`, entry i's value is values[order[i]]."""
    if compiled(values, dense):
        return torch.from_numpy(cpu.csr_matmul(_np(crow), _np(cols), _np(values), _np(dense), transpose,
                                                       None if order is None else _np(order)))
    if order is not None:
        values = values[order]
    product = _csr(crow, cols, values, (crow.numel() - 1, dense.shape[0])) @ dense
    return product.t().contiguous() if transpose else product


@dataclass(frozen=True)
class BatchSums:
    """A batch's reconstruction x_hat = decoded + b_dec, its residual x - x_hat, and the sums every consumer
    (the loss, its gradient, AuxK, the epoch metrics) needs, all from one pass."""

    x_hat: Tensor
    residual: Tensor
    rows: Tensor  # [n, 4] per row: |x|^2, x . x_hat, |x_hat|^2, |x - x_hat|^2
    residual_sum: Tensor  # [d] column sums of the residual
    x_sum: Tensor  # [d] column sums of x

    @property
    def error_sq(self) -> Tensor:
        return self.rows[:, 3].sum()


def batch_sums(decoded: Tensor, bias: Tensor, x: Tensor) -> BatchSums:
    """`BatchSums` of x_hat = decoded + bias against x (no autograd)."""
    decoded, bias = decoded.detach(), bias.detach()
    if compiled(decoded, bias, x):
        x_hat, residual, rows, column_sums = (torch.from_numpy(a) for a in cpu.reconstruct(
            _np(decoded), _np(bias), _np(x)))
        return BatchSums(x_hat, residual, rows, column_sums[0], column_sums[1])
    x_hat = decoded + bias
    residual = x - x_hat
    rows = torch.stack([torch.linalg.vecdot(a, b) for a, b in ((x, x), (x, x_hat), (x_hat, x_hat),
                                                                 (residual, residual))], dim=1)
    return BatchSums(x_hat, residual, rows, residual.sum(0), x.sum(0))


def gather_columns(matrix: Tensor, ids: Tensor) -> Tensor:
    """matrix[:, ids], a new contiguous tensor."""
    if compiled(matrix) and matrix.is_contiguous():
        return torch.from_numpy(cpu.gather_columns(matrix.detach().numpy(), _np(ids)))
    return matrix[:, ids]


def sampled_dots(crow: Tensor, cols: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """left[r] . right[c] for each entry (r, c) of a CSR pattern, in the pattern's order."""
    if compiled(left, right):
        return torch.from_numpy(cpu.sampled_dots(_np(crow), _np(cols), _np(left), _np(right)))
    sampled = _csr(crow, cols, torch.zeros(cols.numel(), dtype=left.dtype, device=left.device),
                   (crow.numel() - 1, right.shape[0]))
    return torch.sparse.sampled_addmm(sampled, left.contiguous(), right.t()).values()


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class Pattern:
    """Index structures of a row-sorted sparsity pattern, built once per step and shared by the kernels.

    Row-major CSR serves the decoder's forward; the transpose (latent-major) serves both weight
    gradients, so its sort is paid once, not once per gradient.
    """

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_latents: int, crow: Tensor | None = None):
        self.rows, self.cols, self.n_rows, self.n_latents = rows, cols, n_rows, n_latents
        self.crow = row_offsets(rows, n_rows) if crow is None else crow
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    def transposed_matmul(self, values: Tensor, dense: Tensor, transpose: bool = False) -> Tensor:
        """S^T @ dense [n_latents, d] for S the [n_rows, n_latents] matrix holding `values` (row-major order);
        with `transpose`, dense^T @ S [d, n_latents] instead."""
        if self._t is None:  # latent-major order: offsets, the permutation, the rows in that order
            if on_cpu(self.cols):
                starts, order = (torch.from_numpy(a) for a in cpu.order_by_column(self.cols.numpy(), self.n_latents))
            else:
                order = torch.argsort(self.cols, stable=True)
                starts = row_offsets(self.cols[order], self.n_latents)
            self._t = (starts, order, self.rows[order])
        starts, order, rows = self._t
        return csr_matmul(starts, rows, values, dense, transpose, order=order)


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
            # latent-major, the fast sparse product; written in the parameter's own layout, or Adam copies it
            if W_enc.is_contiguous():
                grad_W_enc = pattern.transposed_matmul(grad, x_centered, transpose=True)
            else:
                grad_W_enc = pattern.transposed_matmul(grad, x_centered).t()
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_b_dec, grad_W_enc, grad_b_enc if ctx.needs_input_grad[3] else None, None, None


class DecodeSparse(torch.autograd.Function):
    """sum over selected latents of value * W_dec[latent], per row (no decoder bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pattern: Pattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        if compiled(values, W_dec):
            return csr_matmul(pattern.crow, pattern.cols, values, W_dec)
        return torch.nn.functional.embedding_bag(pattern.cols, W_dec, pattern.crow[:-1], mode="sum",
                                                 per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = sampled_dots(pattern.crow, pattern.cols, grad_out, W_dec)
        if ctx.needs_input_grad[1]:
            grad_W_dec = pattern.transposed_matmul(values, grad_out)
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


def codes_from_csr(crow: Tensor, cols: Tensor, values: Tensor, n_latents: int) -> SparseCodes:
    """Codes from row offsets and (row-major, latent-sorted) columns; the pattern comes with them."""
    n_rows = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=cols.device), crow.diff())
    pattern = Pattern(rows, cols, n_rows, n_latents, crow=crow)
    return SparseCodes(rows, cols, values, n_rows, n_latents, _pattern=pattern)
