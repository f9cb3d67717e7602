"""Window planning: each token cached once, with at least `overlap` tokens of left context."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.activations.windows import (
    batch_windows,
    document_windows,
    padding_fraction,
    plan_windows,
    sample_documents,
)


def kept_positions(length: int, n: int, overlap: int, bos: bool) -> dict[int, int]:
    """document position -> left context it gets, for every cached row."""
    seen: dict[int, int] = {}
    for start, size, keep_from in document_windows(length, n, overlap, bos):
        assert size <= n
        for offset in range(keep_from, size):
            position = start + offset
            assert position not in seen, f"position {position} cached twice"
            seen[position] = offset
    return seen


@pytest.mark.parametrize("length", [1, 2, 5, 15, 16, 17, 40, 47, 48, 49, 100, 1000])
@pytest.mark.parametrize(("n", "overlap"), [(16, 4), (16, 1), (16, 15), (7, 3)])
@pytest.mark.parametrize("bos", [False, True])
def test_every_token_cached_once_with_enough_context(length: int, n: int, overlap: int, bos: bool) -> None:
    seen = kept_positions(length, n, overlap, bos)
    expected = set(range(0 if bos else 1, length))
    assert set(seen) == expected
    for position, context in seen.items():
        assert context >= min(position, overlap)  # all of its document near the start, else >= overlap
    # each token comes from the earliest window holding it, i.e. the one giving the most left context
    for start, size, keep_from in document_windows(length, n, overlap, bos):
        for offset in range(size):
            if offset < keep_from and start + offset in seen:
                assert seen[start + offset] > offset


def test_model_position_zero_never_cached_without_bos() -> None:
    for start, _, keep_from in document_windows(100, 16, 4, bos=False):
        assert keep_from >= 1  # offset 0 is model position 0: the attention sink
        if start == 0:
            assert keep_from == 1


def test_last_window_ends_at_document_end_without_padding() -> None:
    windows = document_windows(40, 16, 4, bos=False)
    assert [w[0] for w in windows] == [0, 12, 24]
    assert windows[-1][0] + windows[-1][1] == 40
    assert windows[-1][1] == 16
    windows = document_windows(30, 16, 4, bos=False)
    assert windows == [(0, 16, 1), (12, 16, 4), (24, 6, 4)]  # a short tail window, no padding


def test_plan_counts_and_max_rows() -> None:
    lengths = np.array([10, 50, 3, 100])
    plan = plan_windows(lengths, 16, 4, bos=False)
    assert plan.cached_rows == int((lengths - 1).sum())
    assert plan.model_tokens == int(plan.length.sum())
    assert plan.model_tokens > plan.cached_rows  # overlap costs recomputation
    capped = plan_windows(lengths, 16, 4, bos=False, max_rows=20)
    assert set(capped.doc.tolist()) == {0, 1}  # stops after the document that reaches 20 rows


def test_document_rows_and_select() -> None:
    lengths = np.array([10, 50, 1, 100])
    plan = plan_windows(lengths, 16, 4, bos=False)
    assert plan.document_rows(5).tolist() == [9, 49, 0, 99, 0]
    kept = plan.select(plan.doc != 1)
    assert set(kept.doc.tolist()) == {0, 3} and kept.cached_rows == 9 + 99


def test_sample_keeps_both_splits_in_proportion_and_spreads_over_the_corpus() -> None:
    rng = np.random.default_rng(0)
    doc_rows = rng.integers(50, 150, 1000)
    split = (rng.random(1000) < 0.1).astype(np.int8)  # ~10% validation documents
    chosen = sample_documents(doc_rows, split, max_rows=20_000, seed=0)
    assert np.array_equal(chosen, np.sort(np.unique(chosen)))
    assert np.array_equal(chosen, sample_documents(doc_rows, split, 20_000, seed=0))
    assert not np.array_equal(chosen, sample_documents(doc_rows, split, 20_000, seed=1))
    rows = doc_rows[chosen]
    assert 20_000 <= rows.sum() <= 20_000 + 2 * 150  # each split overshoots by less than one document
    val_share = rows[split[chosen] == 1].sum() / rows.sum()
    full_share = doc_rows[split == 1].sum() / doc_rows.sum()
    assert abs(val_share - full_share) < 0.01
    assert chosen.min() < 100 and chosen.max() > 900  # not the corpus's first documents only


def test_sample_keeps_a_document_of_each_split_on_a_tiny_budget() -> None:
    doc_rows = np.array([100, 100, 0, 100, 100])
    split = np.array([0, 0, 1, 1, 0], dtype=np.int8)
    chosen = sample_documents(doc_rows, split, max_rows=1, seed=0)
    assert len(chosen) == 2 and set(split[chosen].tolist()) == {0, 1}
    assert 2 not in chosen  # a document without a cacheable row is never drawn


def test_batches_respect_token_budget_and_cover_each_window_once() -> None:
    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.full(50, 64), rng.integers(2, 64, 200)])
    batches = batch_windows(lengths, token_budget=8 * 64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * lengths[b].max() <= 8 * 64 or len(b) == 1
    # full windows fill batches of exactly 8; sorting keeps padding small
    assert all(len(b) == 8 for b in batches[:6])
    assert padding_fraction(lengths, batches) < 0.05
    # short windows share batches many at a time
    assert max(len(b) for b in batches) > 8
