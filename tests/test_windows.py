"""Window planning: each token cached once, with at least `overlap` tokens of left context."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.activations.windows import batch_windows, document_windows, padding_fraction, plan_windows


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
