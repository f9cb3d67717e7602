"""Build the activation DB (layout in `analysis.activation_db`) from the activation cache, in bounded memory.

Pass 1 streams the cache's rows through the SAE's inference encode in batches and appends each batch's
codes to the token-major CSR, counting every feature's tokens on the way. Pass 2 builds the feature-major
index out of core: the counts fix every feature's slice of the CSC, features are grouped into blocks
whose entries fit `max_memory_mb`, and each block is one sequential pass over the CSR (a counting-sort
scatter into the preallocated block), then a per-feature sort by activation and the block's statistics.
With the defaults the whole CSC of a few million tokens is one block. Beyond the budget, memory holds
only per-row bookkeeping (about 30 bytes a row) and the per-feature arrays.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from saepipe.activations.cache import ActivationCache
from saepipe.analysis.activation_db import FORMAT, FORMAT_VERSION, SPLIT_CODES, STAT_FIELDS
from saepipe.errors import UserError
from saepipe.kernels.csc import scatter_block, sort_segments
from saepipe.sae import SparseAutoencoder
from saepipe.storage import atomic_h5

ENTRY_CHUNK = 1 << 16
"""HDF5 chunk length (entries) of the CSR and CSC arrays."""
BLOCK_BYTES_PER_ENTRY = 8  # int32 row + float32 value
READ_BYTES_PER_ENTRY = 12  # int32 feature + stored value + its float32 copy


def encode_batch_limit(d_in: int, d_sae: int, max_memory_mb: int) -> int:
    """Most rows one encode batch may hold within `max_memory_mb` (the encode pass and the reverse index
    run one after the other, so each may use the whole budget): a row costs its float32 activations twice
    (read, then on the device) and d_sae float32 pre-activations twice (the encode and its codes);
    measured on the default SAE (L0 38 on its activations, 167 on random rows) a row costs half of that or
    less. An untrained SAE that fires every feature holds far more codes: its rows cost several times this."""
    return max(1, (max_memory_mb << 20) // (4 * (2 * d_in + 2 * d_sae)))


@dataclass(frozen=True)
class BuildResult:
    n_rows: int
    nnz: int
    blocks: int
    outlier_rows: int
    encode_seconds: float
    index_seconds: float


def feature_blocks(counts: np.ndarray, max_entries: int) -> list[tuple[int, int]]:
    """Consecutive feature ranges [f0, f1) holding at most `max_entries` entries each (a feature with
    more is a block of its own: a slice is never split)."""
    blocks, start, held = [], 0, 0
    for f, count in enumerate(counts.tolist()):
        if held and held + count > max_entries:
            blocks.append((start, f))
            start, held = f, 0
        held += count
    blocks.append((start, len(counts)))
    return blocks


def document_index(doc_id: np.ndarray, position: np.ndarray, n_documents: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, first_position, rows_by_position): each document's rows in position order, which must be
    consecutive positions (the activation cache holds every token of a document but the first)."""
    order = np.lexsort((position, doc_id))
    counts = np.bincount(doc_id, minlength=n_documents)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    first = np.zeros(n_documents, np.int32)
    present = counts > 0
    first[present] = position[order[offsets[:-1][present]]]
    docs = doc_id[order]
    expected = first[docs].astype(np.int64) + np.arange(len(order)) - offsets[docs]
    if not np.array_equal(position[order].astype(np.int64), expected):
        bad = int(docs[np.flatnonzero(position[order] != expected)[0]])
        raise ValueError(f"the cached positions of document {bad} are not consecutive")
    return offsets, first, order.astype(np.int32)


def _resizable(group: h5py.Group, name: str, dtype: Any) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(ENTRY_CHUNK,))


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    n = dataset.shape[0]
    dataset.resize((n + len(values),))
    dataset[n:] = values


@torch.no_grad()
def encode_rows(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-row counts, features, values) of a batch, row-major with features ascending, activations > 0:
    the inference encode `evaluate` uses (raw activations in, BatchTopK's exported threshold)."""
    codes = sae.inference_codes(sae.pre_activations(x))
    keep = codes.values > 0
    rows, cols = codes.rows[keep].cpu().numpy(), codes.cols[keep].cpu().numpy()
    values = codes.values[keep].float().cpu().numpy()
    key = rows * codes.n_latents + cols
    if len(key) > 1 and not (np.diff(key) > 0).all():
        order = np.argsort(key, kind="stable")
        rows, cols, values = rows[order], cols[order], values[order]
    return np.bincount(rows, minlength=codes.n_rows), cols.astype(np.int32), values


def build_activation_db(path: str | Path, sae: SparseAutoencoder, cache: ActivationCache, splits: Sequence[str], *,
                        n_documents: int, values_dtype: str, quantiles: Sequence[float], batch_size: int,
                        max_memory_mb: int, attrs: dict[str, Any], include_outliers: bool = False,
                        progress: bool = True) -> BuildResult:
    """Write the DB for `splits` of `cache` to `path` (atomically: complete or not at all).

    Rows the cache flagged as massive-activation outliers stay in the DB as rows without features (and
    out of every statistic) unless `include_outliers`: their norms are ~100x the rest, and a handful of
    them would otherwise head many features' top examples, as they would dominate FVU in `evaluate`.
    """
    device = sae.W_enc.device
    n_rows = sum(cache.n_rows(s) for s in splits)
    d_sae = sae.d_sae
    with atomic_h5(path) as f:
        rows = f.create_group("rows")
        columns = {name: np.concatenate([cache.column(s, column) for s in splits]).astype(np.int32)
                   for name, column in (("token_id", "token_ids"), ("doc_id", "doc_ids"), ("position", "positions"))}
        for name, values in columns.items():
            rows.create_dataset(name, data=values)
        rows.create_dataset("split", data=np.concatenate(
            [np.full(cache.n_rows(s), SPLIT_CODES[s], np.int8) for s in splits]))
        outlier = np.concatenate([cache.column(s, "outlier") for s in splits]).astype(bool)
        rows.create_dataset("outlier", data=outlier)
        skipped = np.zeros(n_rows, bool) if include_outliers else outlier
        try:
            offsets, first, by_position = document_index(columns["doc_id"], columns["position"], n_documents)
        except ValueError as exc:
            raise UserError(f"{cache.path}: {exc}; rerun `saepipe activations`") from None
        docs = f.create_group("docs")
        docs.create_dataset("offsets", data=offsets)
        docs.create_dataset("first_position", data=first)
        docs.create_dataset("rows_by_position", data=by_position)
        del columns, offsets, first, by_position

        csr = f.create_group("csr")
        indptr = np.zeros(n_rows + 1, np.int64)
        features = _resizable(csr, "features", np.int32)
        values_ds = _resizable(csr, "values", values_dtype)
        counts = np.zeros(d_sae, np.int64)
        started = time.perf_counter()
        row = 0
        with tqdm(total=n_rows, desc="activation-db: encode", unit="tok", unit_scale=True,
                  disable=not progress) as bar:
            for split in splits:
                for start in range(0, cache.n_rows(split), batch_size):
                    stop = min(start + batch_size, cache.n_rows(split))
                    per_row, cols, vals = encode_rows(sae, cache.read(split, start, stop).to(device))
                    skip = skipped[row : row + len(per_row)]
                    if skip.any():  # outlier rows keep their place, without features
                        keep = ~np.repeat(skip, per_row)
                        cols, vals, per_row = cols[keep], vals[keep], np.where(skip, 0, per_row)
                    indptr[row + 1 : row + 1 + len(per_row)] = indptr[row] + np.cumsum(per_row)
                    row += len(per_row)
                    _append(features, cols)
                    _append(values_ds, vals.astype(values_dtype))
                    counts += np.bincount(cols, minlength=d_sae)
                    bar.update(stop - start)
        csr.create_dataset("indptr", data=indptr)
        encode_seconds = time.perf_counter() - started
        nnz = int(indptr[-1])

        started = time.perf_counter()
        budget = max_memory_mb << 20
        blocks = feature_blocks(counts, max(1, budget // 2 // BLOCK_BYTES_PER_ENTRY))
        stats = _write_csc(f, indptr, counts, blocks, quantiles, values_dtype, budget // 2 // READ_BYTES_PER_ENTRY,
                           n_rows - int(skipped.sum()), progress)
        index_seconds = time.perf_counter() - started

        group = f.create_group("features")
        for name in STAT_FIELDS:
            group.create_dataset(name, data=stats[name])
        group.create_dataset("quantiles", data=stats["quantiles"])
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "d_sae": d_sae, "d_in": sae.d_in,
                        "n_rows": n_rows, "nnz": nnz, "splits": list(splits), "values_dtype": values_dtype,
                        "outliers_included": include_outliers, "outlier_rows": int(outlier.sum()),
                        "counted_rows": n_rows - int(skipped.sum()),
                        "quantiles": list(quantiles), **attrs})
    return BuildResult(n_rows=n_rows, nnz=nnz, blocks=len(blocks), outlier_rows=int(outlier.sum()),
                       encode_seconds=encode_seconds,
                       index_seconds=index_seconds)


def _row_chunks(indptr: np.ndarray, max_entries: int) -> list[tuple[int, int]]:
    """Row ranges of the CSR holding at most `max_entries` entries each (at least one row)."""
    chunks, start, n_rows = [], 0, len(indptr) - 1
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + max_entries, side="right")) - 1
        stop = min(max(stop, start + 1), n_rows)
        chunks.append((start, stop))
        start = stop
    return chunks


def _write_csc(f: h5py.File, indptr: np.ndarray, counts: np.ndarray, blocks: list[tuple[int, int]],
               quantiles: Sequence[float], values_dtype: str, read_entries: int, counted_rows: int,
               progress: bool) -> dict[str, Any]:
    """The sorted reverse index, block by block, and every feature's statistics from it (density over the
    `counted_rows` rows that are not skipped outliers)."""
    d_sae, nnz, n_rows = len(counts), int(indptr[-1]), len(indptr) - 1
    csc_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    csc = f.create_group("csc")
    csc.create_dataset("indptr", data=csc_indptr)
    row_dtype = np.int32 if n_rows < 2**31 else np.int64
    rows_ds = csc.create_dataset("rows", shape=(nnz,), dtype=row_dtype, chunks=(min(ENTRY_CHUNK, max(nnz, 1)),))
    values_ds = csc.create_dataset("values", shape=(nnz,), dtype=values_dtype,
                                   chunks=(min(ENTRY_CHUNK, max(nnz, 1)),))
    levels = np.asarray(quantiles, np.float64)
    sums, maxima = np.zeros(d_sae, np.float64), np.zeros(d_sae, np.float32)
    quantile_values = np.zeros((d_sae, len(levels)), np.float32)
    row_chunks = _row_chunks(indptr, max(1, read_entries))
    csr_features, csr_values = f["csr/features"], f["csr/values"]
    bar = tqdm(blocks, desc="activation-db: reverse index", unit="block", disable=not progress or len(blocks) < 2)
    for f0, f1 in bar:
        a, b = int(csc_indptr[f0]), int(csc_indptr[f1])
        out_rows = np.empty(b - a, row_dtype)
        out_values = np.empty(b - a, np.float32)
        fill = csc_indptr[f0:f1] - a
        for r0, r1 in row_chunks:
            ptr = indptr[r0 : r1 + 1]
            lo, hi = int(ptr[0]), int(ptr[-1])
            scatter_block(ptr, r0, csr_features[lo:hi], csr_values[lo:hi].astype(np.float32), f0, f1, fill,
                          out_rows, out_values)
        block_sums, block_max = np.zeros(f1 - f0), np.zeros(f1 - f0, np.float32)
        block_quantiles = np.zeros((f1 - f0, len(levels)), np.float32)
        sort_segments(csc_indptr[f0 : f1 + 1] - a, out_rows, out_values, levels, block_sums, block_max,
                      block_quantiles)
        rows_ds[a:b] = out_rows
        values_ds[a:b] = out_values.astype(values_dtype)
        sums[f0:f1], maxima[f0:f1], quantile_values[f0:f1] = block_sums, block_max, block_quantiles
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    return {"count": counts, "density": counts / max(counted_rows, 1), "sum": sums, "mean": mean, "max": maxima,
            "quantiles": quantile_values}
