"""Which latents a batch keeps: per-row top-k, the batch-wide top-k, everything above a threshold, and
the exact threshold that keeps k per row on average over many batches.

The results are `SparseCodes` with their CSR pattern already built, sorted by row then latent. On CPU
float tensors the batch-wide selections run the compiled loops of `kernels.cpu` (one bit-marking pass and
one gather over the set bits, no dense mask or nonzero); elsewhere, torch operators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from saepipe.kernels import sparse  # `sparse.compiled` through the module: tests patch that one name
from saepipe.kernels.cpu import count_above, gather_marked, keep_top
from saepipe.kernels.sparse import SparseCodes, codes_from_csr, row_offsets

if TYPE_CHECKING:
    from saepipe.distributed import World


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


def sharded_batch_top_k(pre: Tensor, k_per_row: int, world: World, hint: float | None = None,
                        bias: Tensor | None = None) -> tuple[SparseCodes, float]:
    """`batch_top_k` over a global batch whose rows are split across the ranks of `world`, rank r holding
    the r-th contiguous block: the same entries a single process would keep on the whole batch (ties at
    the cut in global row-major order), and the smallest kept value (the same on every rank).

    Each rank marks its entries above a threshold common to all ranks (the hint, else the smallest of
    the ranks' sampled quantiles, else 0) until together they hold at least k_per_row x global rows;
    the candidates' values are then gathered to find the global cut.
    """
    if bias is not None:
        pre.add_(bias)
    n_rows, n_latents = pre.shape
    global_rows = world.sum_int(n_rows, pre.device)
    k_total = min(k_per_row * global_rows, global_rows * n_latents)
    thresholds: list[float] = [hint, 0.85 * hint, 0.7 * hint] if hint is not None and hint > 0 else []
    local_share = max(1, round(k_total * n_rows / max(global_rows, 1)))
    thresholds.append(-1.0)  # placeholder for the sampled cut, computed only if the hints fall short
    thresholds.append(0.0)
    for threshold in thresholds:
        if threshold == -1.0:
            threshold = world.min_float(next(_falling_thresholds(pre.reshape(-1), local_share, n_latents, None)),
                                        pre.device)
        candidates = codes_above(pre, threshold)
        found = world.sum_int(candidates.nnz, pre.device)
        if found >= k_total:
            break
    values = world.gather(candidates.values.detach())
    every = torch.cat(values)
    if every.numel() <= k_total:
        return candidates, float(every.min()) if every.numel() else float("inf")
    cut = float(torch.topk(every, k_total, sorted=False).values.min())
    above = [int((v > cut).sum()) for v in values]
    ties = [int((v == cut).sum()) for v in values]
    ties_wanted = k_total - sum(above)
    mine = min(max(ties_wanted - sum(ties[: world.rank]), 0), ties[world.rank])
    local = candidates.values.detach()
    keep = local > cut
    if mine:
        keep[(local == cut).nonzero().squeeze(1)[:mine]] = True
    rows = candidates.rows[keep]
    return codes_from_csr(row_offsets(rows, n_rows), candidates.cols[keep], local[keep], n_latents), cut


def codes_above(pre: Tensor, threshold: float) -> SparseCodes:
    """The entries of `pre` above `threshold`, as codes (on the CPU without a dense mask or nonzero pass)."""
    if sparse.compiled(pre) and pre.is_contiguous():
        values = pre.detach().numpy()
        crow, cols, kept = gather_marked(values, *count_above(values, threshold)[::-1])
        return codes_from_csr(torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(kept), pre.shape[1])
    rows, cols = (pre > threshold).nonzero(as_tuple=True)
    return codes_from_csr(row_offsets(rows, pre.shape[0]), cols, pre[rows, cols], pre.shape[1])


def exact_cut(batches: Iterable[Tensor], k_per_row: int, n_rows: int) -> tuple[float, float]:
    """(threshold, mean kept per row): the threshold above which exactly k_per_row x n_rows entries of all
    `batches` (pre-activations, n_rows rows in all) lie, and the count above it per row (k_per_row unless
    there are fewer positive entries, or ties at the cut).

    One pass, exact, memory bounded by about twice the kept entries plus one batch: the (k N + 1)-th largest
    value seen so far can only rise as batches arrive, so entries below it are dropped as they come. The
    threshold is the midpoint between the k N-th and (k N + 1)-th largest values, so that a token encoded
    with `pre > threshold` keeps the same entries whatever the rounding of the last bit.
    """
    want = k_per_row * n_rows + 1
    kept: list[Tensor] = []
    n_kept, floor = 0, 0.0
    for pre in batches:
        values = codes_above(pre, math.nextafter(floor, -math.inf) if floor > 0 else 0.0).values.detach()
        kept.append(values.float().cpu())
        n_kept += values.numel()
        if n_kept > 2 * want:
            everything = torch.cat(kept)
            floor = float(torch.kthvalue(everything, everything.numel() - want + 1).values)
            kept = [everything[everything >= floor]]
            n_kept = kept[0].numel()
    everything = torch.cat(kept) if kept else torch.zeros(0)
    if everything.numel() < want:  # every positive entry is kept
        return 0.0, everything.numel() / max(n_rows, 1)
    top = torch.topk(everything, want).values  # sorted, largest first
    threshold = float((top[-2].double() + top[-1].double()) / 2)
    if not top[-1] < threshold < top[-2]:  # adjacent floats or a tie at the cut: keep the k N-th
        threshold = float(top[-1])
    return threshold, int((everything > threshold).sum()) / n_rows


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
