"""Document-aligned sliding windows: context without position artefacts.

A window holds up to `n` document tokens (the window length less the BOS slot, if any). Consecutive
windows of a document overlap by `overlap` tokens, which serve as context only. Each token is cached
once, from the earliest window that contains it, which is the one that gives it the most left context:
every token sees at least `overlap` preceding tokens of its document, or all of them near its start.
Model position 0 (the attention sink, or the BOS token) is never cached: its residual norm is ~100x
the rest. The last window of a document ends at the document's end, so it may be shorter than `n`.

Batches hold windows of similar length (sorted, longest first) up to a fixed token budget and are
right-padded: the model is causal, so padding after a window's last token cannot change its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """One row per window: which document, where it starts, how long, from which offset rows are kept."""

    doc: np.ndarray  # int64 document id
    start: np.ndarray  # int64 first document position in the window
    length: np.ndarray  # int64 document tokens in the window
    keep_from: np.ndarray  # int64 offset (in document tokens) of the first cached row

    def __len__(self) -> int:
        return len(self.doc)

    @property
    def model_tokens(self) -> int:
        """Document tokens the model runs over (context included, BOS and padding excluded)."""
        return int(self.length.sum())

    @property
    def cached_rows(self) -> int:
        return int((self.length - self.keep_from).sum())

    def select(self, mask: np.ndarray) -> WindowPlan:
        """The windows where `mask` is true, in order."""
        return WindowPlan(doc=self.doc[mask], start=self.start[mask], length=self.length[mask],
                          keep_from=self.keep_from[mask])

    def document_rows(self, n_documents: int) -> np.ndarray:
        """Cached rows per document (int64, one entry per document id)."""
        return np.bincount(self.doc, weights=self.length - self.keep_from, minlength=n_documents).astype(np.int64)


def document_windows(length: int, n: int, overlap: int, bos: bool) -> list[tuple[int, int, int]]:
    """(start, length, keep_from) for the windows of one document of `length` tokens."""
    first_kept = 0 if bos else 1  # without BOS, document position 0 sits at model position 0
    windows = []
    start = 0
    while True:
        size = min(n, length - start)
        keep_from = first_kept if start == 0 else overlap
        if size > keep_from:
            windows.append((start, size, keep_from))
        if start + n >= length:
            return windows
        start += n - overlap


def plan_windows(
    lengths: np.ndarray, n: int, overlap: int, bos: bool, max_rows: int | None = None
) -> WindowPlan:
    """Windows for every document in order; with `max_rows`, stop after the document that reaches it."""
    if not 0 < overlap < n:
        raise ValueError(f"overlap must be in [1, {n - 1}], got {overlap}")
    rows: list[tuple[int, int, int, int]] = []
    cached = 0
    for doc, length in enumerate(lengths.tolist()):
        for start, size, keep_from in document_windows(length, n, overlap, bos):
            rows.append((doc, start, size, keep_from))
            cached += size - keep_from
        if max_rows is not None and cached >= max_rows:
            break
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return WindowPlan(doc=table[:, 0], start=table[:, 1], length=table[:, 2], keep_from=table[:, 3])


def sample_documents(doc_rows: np.ndarray, split: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Ascending ids of a seeded sample of documents holding about `max_rows` cached rows in all.

    Each split gets its share of the budget (its share of all cacheable rows) and draws its documents in a
    seeded random order until that share is reached (the document that crosses it is kept whole, and every
    split with a cacheable document keeps at least one), so the sample keeps the splits in proportion and
    spreads over the whole corpus rather than its first chapters.
    """
    rng = np.random.default_rng(seed)
    total = int(doc_rows.sum())
    chosen: list[np.ndarray] = []
    for value in np.unique(split):
        candidates = np.flatnonzero((split == value) & (doc_rows > 0))
        if not len(candidates):
            continue
        order = rng.permutation(candidates)
        budget = max_rows * int(doc_rows[candidates].sum()) / total
        take = int(np.searchsorted(np.cumsum(doc_rows[order]), budget)) + 1
        chosen.append(order[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def batch_windows(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Group window indices into batches of at most `token_budget` padded positions, longest first.

    Sorting by length keeps the padding of each batch small; short windows share a batch many at a time.
    """
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    batches: list[np.ndarray] = []
    i = 0
    while i < len(order):
        padded = int(lengths[order[i]])
        rows = max(1, token_budget // padded)
        batches.append(order[i : i + rows])
        i += rows
    return batches


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0
