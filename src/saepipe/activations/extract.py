"""Run the model over planned windows, stopping after the hook's layer, and stream the rows out.

Kept separate from the cache format so that a benchmark can time the very same loop against a
bare forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saepipe.activations.windows import WindowPlan
from saepipe.corpus.tokens import TokenCache
from saepipe.model.hooks import HookSpec


@dataclass(frozen=True)
class WindowBatch:
    """A padded batch of windows: model input plus which output rows to keep, and their labels."""

    tokens: torch.Tensor  # int64 [batch, padded_len]
    row_select: tuple[torch.Tensor, torch.Tensor]  # (batch index, model position) of each kept row
    token_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    model_tokens: int  # real (unpadded) positions fed to the model, BOS included


def build_batch(plan: WindowPlan, batch: np.ndarray, cache: TokenCache, bos_id: int | None,
                pad_id: int) -> WindowBatch:
    bos = bos_id is not None
    lengths = plan.length[batch] + int(bos)
    tokens = np.full((len(batch), int(lengths.max())), pad_id, dtype=np.int64)
    rows_b, rows_p, doc_ids, positions = [], [], [], []
    for i, w in enumerate(batch.tolist()):
        doc, start, size, keep = (int(plan.doc[w]), int(plan.start[w]), int(plan.length[w]),
                                  int(plan.keep_from[w]))
        ids = cache.document(doc)[start : start + size]
        if bos:
            tokens[i, 0] = bos_id
        tokens[i, int(bos) : int(bos) + size] = ids
        kept = np.arange(keep, size)
        rows_b.append(np.full(len(kept), i))
        rows_p.append(kept + int(bos))
        doc_ids.append(np.full(len(kept), doc, dtype=np.int32))
        positions.append((start + kept).astype(np.int32))
    b, p = np.concatenate(rows_b), np.concatenate(rows_p)
    return WindowBatch(
        tokens=torch.from_numpy(tokens),
        row_select=(torch.from_numpy(b), torch.from_numpy(p)),
        token_ids=tokens[b, p].astype(np.int32),
        doc_ids=np.concatenate(doc_ids),
        positions=np.concatenate(positions),
        model_tokens=int(lengths.sum()),
    )


def hook_activations(model: Any, hook: HookSpec, tokens: torch.Tensor) -> torch.Tensor:
    """The hook's activations [batch, seq, d_model]; blocks after the hook's layer are not run."""
    return hooks_activations(model, [hook], tokens)[0]


def hooks_activations(model: Any, hooks: Sequence[HookSpec], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each hook's activations from one forward pass that stops after the deepest hook's layer."""
    captured: list[torch.Tensor | None] = [None] * len(hooks)

    def grabber(index: int) -> Callable[[torch.Tensor, Any], None]:
        def grab(activation: torch.Tensor, hook: Any) -> None:
            captured[index] = activation

        return grab

    model.run_with_hooks(tokens, fwd_hooks=[(h.full_name, grabber(i)) for i, h in enumerate(hooks)],
                         stop_at_layer=max(h.stop_at_layer for h in hooks))
    return captured  # type: ignore[return-value]


def extract(
    model: Any,
    hook: HookSpec,
    plan: WindowPlan,
    batches: list[np.ndarray],
    cache: TokenCache,
    bos_id: int | None,
    pad_id: int,
    device: torch.device,
    sink: Callable[[torch.Tensor, WindowBatch], None],
    progress: bool = True,
) -> int:
    """Feed every batch through the model and hand the kept float32 rows to `sink`; returns model tokens."""
    return extract_hooks(model, [hook], plan, batches, cache, bos_id, pad_id, device,
                         lambda rows, wb: sink(rows[0], wb), progress)


def extract_hooks(
    model: Any,
    hooks: Sequence[HookSpec],
    plan: WindowPlan,
    batches: list[np.ndarray],
    cache: TokenCache,
    bos_id: int | None,
    pad_id: int,
    device: torch.device,
    sink: Callable[[list[torch.Tensor], WindowBatch], None],
    progress: bool = True,
) -> int:
    """`extract` for several hooks: one forward pass per batch, `sink` gets each hook's rows in order."""
    lengths = plan.length[np.concatenate(batches)] if batches else plan.length[:0]
    total = int(lengths.sum()) + (len(lengths) if bos_id is not None else 0)
    done = 0
    with torch.inference_mode(), tqdm(total=total, desc="activations", unit="tok", unit_scale=True,
                                      disable=not progress, smoothing=0.1) as bar:
        for wb in iter_window_batches(plan, batches, cache, bos_id, pad_id):
            b, p = (index.to(device) for index in wb.row_select)
            acts = hooks_activations(model, hooks, wb.tokens.to(device))
            sink([a[b, p].float().cpu() for a in acts], wb)
            done += wb.model_tokens
            bar.update(wb.model_tokens)
    return done


def iter_window_batches(plan: WindowPlan, batches: list[np.ndarray], cache: TokenCache, bos_id: int | None,
             pad_id: int) -> Iterator[WindowBatch]:
    for batch in batches:
        yield build_batch(plan, batch, cache, bos_id, pad_id)
