"""Feature x feature matrices of an SAE: decoder similarity and co-occurrence on tokens.

Pure computations on arrays (no files, no params); the `matrices` stage writes what they return.

    cosine(i, j)   W_dec[i] . W_dec[j] / (|W_dec[i]| |W_dec[j]|); 0 where either row has norm 0
    fires          a feature fires on a token when its activation is > 0
    C[i, j]        tokens on which features i and j both fire; C[i, i] = c_i, the tokens feature i fires on
    J[i, j]        Jaccard: C[i, j] / (c_i + c_j - C[i, j]); 0 where the denominator is 0

Both are computed in row blocks so that nothing larger than block x d_sae is held besides the outputs: the
dense d_sae x d_sae matrices are written only when asked for (`dense_out`, which may be a memory-mapped
`.npy`), and the top-k neighbours, the per-feature max cosine and the pairs above a threshold are taken block
by block. Co-occurrence is `B.T @ B` over the binarised token x feature CSR, chunk by chunk, with
scipy.sparse products: never a dense tokens x features array. Without a dense accumulator the sum of the
products is kept as a sparse matrix (memory grows with the number of distinct co-occurring pairs).

Top-k co-occurring features are ordered by Jaccard, then by feature id (so both paths agree exactly on
ties); only features that fire together at least once are listed, the rest of a row is padded with id -1,
Jaccard 0 and count 0 (features that never fire have rows of padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import torch
from tqdm import tqdm

JACCARD_FORMULA = "J[i, j] = C[i, j] / (c_i + c_j - C[i, j]), 0 where the denominator is 0; C[i, j] = tokens on " \
                  "which features i and j both fire (activation > 0), c_i = C[i, i]"
HISTOGRAM_RANGE = (-1.0, 1.0)
"""The max-cosine histogram's bins span the whole cosine range, so runs compare bin for bin."""


# ---- decoder similarity ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderSimilarity:
    ids: np.ndarray  # int64 [d_sae, k]: nearest other features by decoder cosine, nearest first
    values: np.ndarray  # float32 [d_sae, k]: their cosines
    pairs_above: int  # unordered pairs i < j with cosine > threshold
    threshold: float
    zero_norm: np.ndarray  # bool [d_sae]: decoder rows of norm 0 (cosine 0 with everything)

    @property
    def max_cosine(self) -> np.ndarray:
        """float32 [d_sae]: each feature's largest cosine to any other feature (nan when d_sae is 1)."""
        if self.values.shape[1] == 0:
            return np.full(len(self.values), np.nan, np.float32)
        return self.values[:, 0]


def _blocks(n: int, block_size: int) -> range:
    return range(0, n, block_size)


def decoder_similarity(W_dec: torch.Tensor, k: int, block_size: int, threshold: float, *,
                       dense_out: np.ndarray | None = None, progress: bool = False) -> DecoderSimilarity:
    """Top-k decoder neighbours (self excluded) and the pairs above `threshold`, one row block at a time.

    k is capped at d_sae - 1. `dense_out` (float32 [d_sae, d_sae]), when given, receives the full cosine
    matrix block by block, with 1 on the diagonal for nonzero rows (0 for zero-norm rows).
    """
    d_sae = W_dec.shape[0]
    k = min(k, d_sae - 1)
    if dense_out is not None and dense_out.shape != (d_sae, d_sae):
        raise ValueError(f"dense_out has shape {dense_out.shape}, expected {(d_sae, d_sae)}")
    W = W_dec.detach().to("cpu", torch.float32)
    norms = W.norm(dim=1)
    zero = norms == 0
    unit = W / torch.where(zero, torch.ones_like(norms), norms)[:, None]  # zero rows stay zero
    ids = np.zeros((d_sae, k), np.int64)
    values = np.zeros((d_sae, k), np.float32)
    pairs = 0
    columns = torch.arange(d_sae)
    with torch.inference_mode():
        for start in tqdm(_blocks(d_sae, block_size), desc="decoder similarity", unit="block", disable=not progress):
            stop = min(start + block_size, d_sae)
            sims = unit[start:stop] @ unit.T
            rows = torch.arange(start, stop)
            self_pairs = (rows - start, rows)
            if dense_out is not None:
                sims[self_pairs] = torch.where(zero[start:stop], 0.0, 1.0)
                dense_out[start:stop] = sims.numpy()
            pairs += int(((sims > threshold) & (columns[None, :] > rows[:, None])).sum())
            if k:
                sims[self_pairs] = -math.inf
                top = torch.topk(sims, k, dim=1)
                ids[start:stop] = top.indices.numpy()
                values[start:stop] = top.values.numpy()
    return DecoderSimilarity(ids, values, pairs, float(threshold), zero.numpy())


def decoder_cosine_topk(W_dec: torch.Tensor, k: int, block_size: int, dense_out: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [d_sae, k], cosines float32 [d_sae, k]): each feature's nearest others by decoder cosine."""
    result = decoder_similarity(W_dec, k, block_size, threshold=1.0, dense_out=dense_out)
    return result.ids, result.values


# ---- co-occurrence --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cooccurrence:
    ids: np.ndarray  # int64 [d_sae, k]: top co-occurring features by Jaccard, -1 padding
    jaccard: np.ndarray  # float32 [d_sae, k]
    counts: np.ndarray  # int64 [d_sae, k]: tokens on which the pair fires together
    fire_counts: np.ndarray  # int64 [d_sae]: tokens each feature fires on (the diagonal of C)
    n_rows: int  # tokens counted

    def figures(self) -> dict[str, Any]:
        fires = self.fire_counts > 0
        partnered = self.ids[:, 0] >= 0 if self.ids.shape[1] else np.zeros(len(self.ids), bool)
        top1 = self.jaccard[partnered, 0].astype(np.float64)
        return {
            "tokens": self.n_rows,
            "features_never_firing": int((~fires).sum()),
            "features_without_partner": int((fires & ~partnered).sum()),
            "mean_jaccard_top1": float(top1.mean()) if len(top1) else math.nan,
            "median_jaccard_top1": float(np.median(top1)) if len(top1) else math.nan,
            "max_jaccard_top1": float(top1.max()) if len(top1) else math.nan,
            "mean_partners_listed": float((self.ids >= 0).sum(axis=1).mean()) if len(self.ids) else math.nan,
        }


def binarise(chunk: scipy.sparse.spmatrix) -> scipy.sparse.csr_matrix:
    """int64 CSR with 1 where the chunk's value is > 0 (explicit zeros and negatives dropped)."""
    fired = scipy.sparse.csr_matrix(chunk, copy=True)  # eliminate_zeros works in place: leave the caller's alone
    fired.data = (fired.data > 0).astype(np.int64)
    fired.eliminate_zeros()
    return fired


def _pair_products(chunks: Iterable[scipy.sparse.spmatrix], d_sae: int, progress: bool, total: int | None
                   ) -> Iterable[tuple[int, scipy.sparse.csr_matrix]]:
    for chunk in tqdm(chunks, desc="co-occurrence", unit="chunk", total=total, disable=not progress):
        if chunk.ndim != 2 or chunk.shape[1] != d_sae:
            raise ValueError(f"a chunk has shape {chunk.shape}, expected (rows, {d_sae})")
        fired = binarise(chunk)
        product = fired.T.tocsr() @ fired
        product.sum_duplicates()  # per-row, in CSR: a COO round trip would sort every pair of the chunk again
        yield chunk.shape[0], product


def _jaccard(counts: np.ndarray, fire_i: np.ndarray, fire_j: np.ndarray) -> np.ndarray:
    """float64 Jaccard from pair counts and the two features' fire counts (broadcasting), 0 where undefined."""
    denominator = fire_i + fire_j - counts
    return np.divide(counts, denominator, out=np.zeros(np.broadcast(counts, denominator).shape),
                     where=denominator > 0)


def _topk_pairs(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, fire_counts: np.ndarray, k: int,
                out: Cooccurrence) -> None:
    """Write each row's top-k (by Jaccard, then id) of the given off-diagonal, nonzero pairs into `out`."""
    jac = _jaccard(counts.astype(np.float64), fire_counts[rows].astype(np.float64),
                   fire_counts[cols].astype(np.float64))
    order = np.lexsort((cols, -jac, rows))
    rows, cols, counts, jac = rows[order], cols[order], counts[order], jac[order]
    first = np.searchsorted(rows, rows, side="left")  # index of each row's first pair
    rank = np.arange(len(rows)) - first
    keep = rank < k
    r, c = rows[keep], rank[keep]
    out.ids[r, c] = cols[keep]
    out.jaccard[r, c] = jac[keep]
    out.counts[r, c] = counts[keep]


def cooccurrence(chunks: Iterable[scipy.sparse.spmatrix], d_sae: int, k: int, *, block_size: int = 1024,
                 dense_out: np.ndarray | None = None, jaccard_out: np.ndarray | None = None,
                 progress: bool = False, total_chunks: int | None = None) -> Cooccurrence:
    """Pair counts over token x feature CSR chunks, and each feature's top-k co-occurring others (self excluded).

    With `dense_out` (int64 [d_sae, d_sae], e.g. a memory-mapped .npy) the counts C are accumulated there and
    `jaccard_out` (float32, optional) receives J; without it the sum of the chunk products stays sparse and
    only the top-k is taken. Both paths give identical top-k arrays. k is capped at d_sae - 1.
    """
    k = min(k, d_sae - 1)
    for name, array in (("dense_out", dense_out), ("jaccard_out", jaccard_out)):
        if array is not None and array.shape != (d_sae, d_sae):
            raise ValueError(f"{name} has shape {array.shape}, expected {(d_sae, d_sae)}")
    if jaccard_out is not None and dense_out is None:
        raise ValueError("jaccard_out needs dense_out (the dense counts)")
    n_rows = 0
    acc: scipy.sparse.csr_matrix | None = None
    if dense_out is not None:
        dense_out[...] = 0
        flat = dense_out.reshape(-1)
    for rows, product in _pair_products(chunks, d_sae, progress, total_chunks):
        n_rows += rows
        if dense_out is not None:
            rows_of = np.repeat(np.arange(d_sae, dtype=np.int64), np.diff(product.indptr))
            flat[rows_of * d_sae + product.indices] += product.data  # (row, col) unique after sum_duplicates
        else:
            acc = product if acc is None else acc + product
    if dense_out is not None:
        fire_counts = np.diagonal(dense_out).astype(np.int64)
    else:
        acc = scipy.sparse.csr_matrix((d_sae, d_sae), dtype=np.int64) if acc is None else acc
        fire_counts = acc.diagonal().astype(np.int64)
    out = Cooccurrence(np.full((d_sae, k), -1, np.int64), np.zeros((d_sae, k), np.float32),
                       np.zeros((d_sae, k), np.int64), fire_counts, n_rows)
    for start in tqdm(_blocks(d_sae, block_size), desc="co-occurrence top-k", unit="block", disable=not progress):
        stop = min(start + block_size, d_sae)
        if dense_out is not None:
            block = np.asarray(dense_out[start:stop])
            if jaccard_out is not None:
                jaccard_out[start:stop] = _jaccard(block.astype(np.float64), fire_counts[start:stop, None],
                                                   fire_counts[None, :])
            rows, cols = np.nonzero(block)
            counts = block[rows, cols]
        else:
            assert acc is not None
            sub = acc[start:stop].tocoo()
            rows, cols, counts = sub.row, sub.col, sub.data
        rows = rows.astype(np.int64) + start
        cols = cols.astype(np.int64)
        off = (rows != cols) & (counts > 0)
        if k:
            _topk_pairs(rows[off], cols[off], counts[off].astype(np.int64), fire_counts, k, out)
    return out


# ---- summary figures ------------------------------------------------------------------------------------
def max_cosine_histogram(similarity: DecoderSimilarity, bins: int) -> list[dict[str, float | int]]:
    """Rows {"max_cosine": bin centre, "features": count} over [-1, 1] (zero-norm decoder rows left out)."""
    values = np.clip(similarity.max_cosine[~similarity.zero_norm].astype(np.float64), *HISTOGRAM_RANGE)
    counts, edges = np.histogram(values[~np.isnan(values)], bins=bins, range=HISTOGRAM_RANGE)
    centres = (edges[:-1] + edges[1:]) / 2
    return [{"max_cosine": round(float(c), 6), "features": int(n)} for c, n in zip(centres, counts, strict=True)]


def similarity_figures(similarity: DecoderSimilarity) -> dict[str, Any]:
    """Mean and median max cosine over features with a nonzero decoder row, and the near-duplicate counts."""
    values = similarity.max_cosine[~similarity.zero_norm].astype(np.float64)
    values = values[~np.isnan(values)]
    return {
        "mean_max_cosine": float(values.mean()) if len(values) else math.nan,
        "median_max_cosine": float(np.median(values)) if len(values) else math.nan,
        "pairs_above_threshold": similarity.pairs_above,
        "features_with_near_duplicate": int((values > similarity.threshold).sum()),
        "similarity_threshold": similarity.threshold,
        "zero_norm_features": int(similarity.zero_norm.sum()),
    }


def matrices_metrics(similarity: DecoderSimilarity, cooc: Cooccurrence, *, dense: bool) -> dict[str, Any]:
    """The stage's DVC metrics: the similarity figures, d_sae, whether dense matrices were written, co-occurrence."""
    return {**similarity_figures(similarity), "d_sae": len(similarity.ids), "dense": dense,
            "cooccurrence": cooc.figures()}
