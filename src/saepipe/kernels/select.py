"""Which latents a batch keeps: per-row top-k, the batch-wide top-k, everything above a threshold.

The results are `SparseCodes` with their CSR pattern already built, sorted by row then latent. On CPU
float tensors the batch-wide selections run the compiled loops of `kernels.cpu` (one bit-marking pass and
one gather over the set bits, no dense mask or nonzero); elsewhere, torch operators.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from saepipe.kernels import sparse  # `sparse.compiled` through the module: tests patch that one name
from saepipe.kernels.cpu import count_above, gather_marked, keep_top
from saepipe.kernels.sparse import SparseCodes, codes_from_csr, row_offsets


def batch_top_k(pre: Tensor, k_total: int, hint: float | None = None, bias: Tensor | None = None) -> SparseCodes:
    """The k_total largest positive entries of `pre` over the whole batch, exactly.

    A full top-k over rows x latents values costs as much as the encoder matmul, so it is found among
    candidates above a threshold: `hint` (a threshold believed a little below the k_total-th value, e.g.
    the running estimate from earlier steps) or else a quantile of a strided sample. If too few entries
    pass, the threshold is lowered until enough do; the result is the same as a full top-k (ties at the
    cut are kept in row-major order). `bias`, if given, is first added to `pre` in place (on the CPU in
    the same pass as the first count).
    """
    n_rows, n_latents = pre.shape
    k_total = min(k_total, pre.numel())
    flat = pre.reshape(-1)
    on_compiled = sparse.compiled(pre) and pre.is_contiguous()
    if bias is not None and not (on_compiled and hint is not None and hint > 0):
        pre.add_(bias)  # the sampled thresholds below need the biased values
        bias = None
    for threshold in _falling_thresholds(flat, k_total, n_latents, hint):
        if on_compiled:
            counts, mask = count_above(pre.detach().numpy(), threshold,
                                       None if bias is None else bias.detach().numpy())
            bias = None
            found = int(counts.sum())
        else:
            candidates = (flat > threshold).nonzero().squeeze(1)
            found = candidates.numel()
        if found >= k_total:
            break
    if on_compiled:
        crow, cols, values = keep_top(*gather_marked(pre.detach().numpy(), mask, counts), k_total)
        return codes_from_csr(torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(values), n_latents)
    values = flat[candidates]
    if candidates.numel() > k_total:
        keep = torch.topk(values, k_total, sorted=False).indices.sort().values
        candidates, values = candidates[keep], values[keep]
    rows, cols = candidates // n_latents, candidates % n_latents
    return codes_from_csr(row_offsets(rows, n_rows), cols, values, n_latents)


def codes_above(pre: Tensor, threshold: float) -> SparseCodes:
    """The entries of `pre` above `threshold`, as codes (on the CPU without a dense mask or nonzero pass)."""
    if sparse.compiled(pre) and pre.is_contiguous():
        values = pre.detach().numpy()
        crow, cols, kept = gather_marked(values, *count_above(values, threshold)[::-1])
        return codes_from_csr(torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(kept), pre.shape[1])
    rows, cols = (pre > threshold).nonzero(as_tuple=True)
    return codes_from_csr(row_offsets(rows, pre.shape[0]), cols, pre[rows, cols], pre.shape[1])


def _falling_thresholds(flat: Tensor, k_total: int, n_latents: int, hint: float | None) -> Iterator[float]:
    """Candidate cuts, each tried only if the one before let fewer than k_total entries through."""
    if hint is not None and hint > 0:
        yield from (hint, 0.85 * hint, 0.7 * hint)
    stride = 17 if n_latents % 17 else 19  # co-prime with the row length: every latent gets sampled
    sample = flat[::stride]
    want = min(sample.numel(), int(k_total / stride * 1.5) + 16)
    if sparse.on_cpu(sample):  # numpy's selection is ~3x faster than torch's top-k here
        cut = float(np.partition(sample.contiguous().numpy(), sample.numel() - want)[sample.numel() - want])
    else:
        cut = float(torch.topk(sample, want, sorted=False).values.min())
    yield max(cut, 0.0)
    yield 0.0  # every positive entry: fewer than k_total of them is all there is


def row_top_k(pre: Tensor, k: int) -> SparseCodes:
    """The k largest positive entries of each row."""
    n_rows, n_latents = pre.shape
    values, cols = torch.topk(pre, min(k, n_latents), dim=1, sorted=False)
    cols, order = cols.sort(dim=1)
    values = values.gather(1, order)
    positive = values > 0
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=pre.device)
    torch.cumsum(positive.sum(1), 0, out=crow[1:])
    return codes_from_csr(crow, cols[positive], values[positive], n_latents)
