"""What splicing the SAE into the model costs its next-token predictions, against zero- and mean-ablating the hook.

For each window the model runs five times: clean, and with the hook's activations at positions >= 1
replaced by (see `saepipe.model.splice`; position 0, the attention sink or BOS, is never touched)

    sae              x̂ = decode(encode(x))
    sae_with_error   x̂ + (x − x̂)     the SAE's error term added back: must reproduce the clean run
    zero             0
    mean             a fixed mean activation (the activation cache's per-split mean)

and every scored next-token prediction gives, per variant v,

    CE_v             −log p_v(next token)
    KL_v             KL(p_clean ‖ p_v) = Σ_vocab p_clean (log p_clean − log p_v)

averaged over the scored predictions. Then

    ce_loss_recovered          (CE_zero − CE_sae) / (CE_zero − CE_clean)   1: as good as clean; 0: as bad as zero
    ce_loss_recovered_vs_mean  (CE_mean − CE_sae) / (CE_mean − CE_clean)
    ce_loss_increase           CE_sae − CE_clean
    kl_div_score               (KL_zero − KL_sae) / KL_zero

A prediction is scored when it is made at a model position >= 1: the prediction made at position 0 is the
same in every variant (the model is causal and position 0 is untouched), so it would only dilute the
averages. Over a corpus, windows are those of the activation cache (`saepipe.activations.windows`,
document-aligned, overlapping by the cache's context overlap): each target token is scored once, from the
window that gives it the most left context, exactly the tokens whose activations the cache holds.

One call on a batch of unpadded windows [batch, seq]:

    from saepipe.analysis.ablation import ablation_metrics
    figures = ablation_metrics(model, HookSpec(15, "hook_resid_post"), sae, tokens, mean=cache.mean("validation"))

Over a token cache: `plan = ablation_plan(...)`, then `evaluate_ablation(model, hook, sae, token_cache, plan, ...)`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from saepipe.activations.extract import build_batch
from saepipe.activations.windows import WindowPlan, batch_windows, plan_windows
from saepipe.corpus.tokens import SPLIT_NAMES, TokenCache
from saepipe.model.hooks import HookSpec
from saepipe.model.loading import model_device
from saepipe.model.splice import Replacement, splice_hook, spliced
from saepipe.model.split import SplitForward
from saepipe.sae import SparseAutoencoder

VARIANTS = ("sae", "sae_with_error", "zero", "mean")
FORMULAS = {
    "ce": "mean over scored predictions of -log p(next token); scored: made at model position >= 1",
    "kl": "mean over scored predictions of KL(p_clean || p_variant), summed over the vocabulary",
    "ce_loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
    "ce_loss_recovered_vs_mean": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
    "ce_loss_increase": "ce_sae - ce_clean",
    "kl_div_score": "(kl_zero - kl_sae) / kl_zero",
    "splice": "the hook's activations at positions >= 1 replaced by x_hat (sae), x_hat + (x - x_hat) "
              "(sae_with_error), 0 (zero) or the activation cache's split mean (mean); position 0 untouched",
}


def replacements(sae: SparseAutoencoder, mean: Tensor | np.ndarray | None = None) -> dict[str, Replacement]:
    """The spliced variants: name -> what replaces the hook's rows (raw activations, as the export takes)."""
    device = sae.W_enc.device

    def reconstruction(x: Tensor) -> Tensor:
        return sae.decode(sae.encode(x.to(device=device, dtype=torch.float32)))

    def with_error(x: Tensor) -> Tensor:
        x = x.to(device=device, dtype=torch.float32)
        x_hat = sae.decode(sae.encode(x))
        return x_hat + (x - x_hat)

    out: dict[str, Replacement] = {"sae": reconstruction, "sae_with_error": with_error, "zero": torch.zeros_like}
    if mean is not None:
        mean_row = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        out["mean"] = lambda x: mean_row.to(x.device).expand(x.shape[0], -1)
    return out


class AblationAccumulator:
    """Sums of CE (clean and each variant) and KL (each variant) over scored predictions, batch by batch.

    Below the hook the clean and spliced runs are the same, so (`split`, the default) the model runs once up
    to the hook and only the blocks above it run per variant (small batches stacked), the head only at
    scored positions (`saepipe.model.split`); hooks that cannot be split, or a model whose continuation does
    not reproduce its full forward on the first window, get one full forward per variant (`path` says which).
    """

    def __init__(self, variants: Iterable[str], *, split: bool = True):
        self.variants = list(variants)
        self.tokens = 0
        self.ce = {name: 0.0 for name in ["clean", *self.variants]}
        self.kl = {name: 0.0 for name in self.variants}
        self.split = split
        self.path: str | None = None  # "split" or "full", decided on the first batch
        self._splitter: SplitForward | None = None

    def _forward(self, model: Any, hook: HookSpec, tokens: Tensor) -> SplitForward | None:
        if self.path is None:
            if self.split and SplitForward.supports(model, hook):
                self._splitter = SplitForward(model, hook)
                if not self._splitter.agrees(tokens):
                    self._splitter = None
                    tqdm.write(f"ablation: continuing the model above {hook} does not reproduce its full "
                               "forward; running one full forward per variant instead", file=sys.stderr)
            self.path = "full" if self._splitter is None else "split"
        return self._splitter

    @torch.inference_mode()
    def add(self, model: Any, hook: HookSpec, splices: dict[str, Replacement], tokens: Tensor,
            sources: tuple[Tensor, Tensor]) -> None:
        """Run `tokens` [batch, seq] clean and with each splice; score predictions at (batch index, position)."""
        b, s = (t.to(tokens.device) for t in sources)
        if len(b) == 0:
            return
        if bool((s < 1).any()) or bool((s + 1 >= tokens.shape[1]).any()):
            raise ValueError("scored positions must be >= 1 and have a next token in the window")
        targets = tokens[b, s + 1].unsqueeze(1)
        splitter = self._forward(model, hook, tokens)
        runs = [None, *(splices[name] for name in self.variants)]
        logits = (full_forward(model, hook, tokens, b, s, runs) if splitter is None
                  else split_forward(splitter, tokens, b, s, runs))
        log_p = F.log_softmax(next(logits).float(), dim=-1)
        # Once, not once per variant: the vocabulary-wide passes are the cost beyond the forwards.
        # KL(p || q) = -sum p (log q - log p): the difference is formed in place, entry by entry, so a variant
        # that barely moves q is not lost to the cancellation of two large sums (float32 entropies ~ log V).
        p = log_p.exp()
        self.ce["clean"] += float(-log_p.gather(1, targets).sum())
        for name in self.variants:
            log_q = F.log_softmax(next(logits).float(), dim=-1)
            self.ce[name] += float(-log_q.gather(1, targets).sum())
            self.kl[name] -= float(torch.linalg.vecdot(p, log_q.sub_(log_p)).double().sum())
        self.tokens += len(b)

    def result(self) -> dict[str, float | int]:
        if self.tokens == 0:
            raise ValueError("no predictions were scored")
        ce = {name: value / self.tokens for name, value in self.ce.items()}
        kl = {name: value / self.tokens for name, value in self.kl.items()}
        out: dict[str, float | int] = {"tokens": self.tokens}
        out.update({f"ce_{name}": value for name, value in ce.items()})
        out.update({f"kl_{name}": value for name, value in kl.items()})
        out["ce_loss_increase"] = ce["sae"] - ce["clean"]
        out["ce_loss_recovered"] = _ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"])
        if "mean" in ce:
            out["ce_loss_recovered_vs_mean"] = _ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"])
        out["kl_div_score"] = _ratio(kl["zero"] - kl["sae"], kl["zero"])
        return out


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else float("nan")


def full_forward(model: Any, hook: HookSpec, tokens: Tensor, rows: Tensor, positions: Tensor,
                 runs: list[Replacement | None]) -> Iterator[Tensor]:
    """The logits [n, vocab] at (rows, positions) of each run (None: clean; else a splice at the hook), one full
    forward each, the splice as a hook: works at any hook."""
    for replace in runs:
        if replace is None:
            yield model(tokens)[rows, positions]
        else:
            yield model.run_with_hooks(tokens, fwd_hooks=[(hook.full_name, splice_hook(replace))],
                                       reset_hooks_end=True)[rows, positions]


STACK_POSITIONS = 4096
"""Runs are stacked into one batch above the hook up to this many positions: stacking gives a small batch
(one short window) larger products, and a large one nothing but more memory (measured on CPU)."""


def split_forward(splitter: SplitForward, tokens: Tensor, rows: Tensor, positions: Tensor,
                  runs: list[Replacement | None]) -> Iterator[Tensor]:
    """The same logits: the model up to the hook once, the blocks above it per run (runs stacked into one
    batch up to `STACK_POSITIONS`), the head per run and only at (rows, positions)."""
    lower = splitter.lower(tokens)
    per_batch = max(1, STACK_POSITIONS // tokens.numel())
    for first in range(0, len(runs), per_batch):
        activations = [lower.activation if r is None else spliced(lower.activation, r)
                       for r in runs[first:first + per_batch]]
        final = splitter.residuals(lower, activations)
        del activations
        for residual in final.split(tokens.shape[0]):
            yield splitter.head(residual, rows, positions)


# ---- one call on a batch of windows ---------------------------------------------------------------------------
def ablation_metrics(model: Any, hook: HookSpec, sae: SparseAutoencoder, tokens: Tensor,
                     mean: Tensor | np.ndarray | None = None) -> dict[str, float | int]:
    """Every figure above for unpadded windows [batch, seq] (seq >= 3), scoring positions 1 .. seq - 2."""
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens must be [batch, seq] with seq >= 3, got shape {tuple(tokens.shape)}")
    splices = replacements(sae, mean)
    acc = AblationAccumulator(splices)
    tokens = tokens.to(device=model_device(model), dtype=torch.long)
    positions = torch.arange(1, tokens.shape[1] - 1)
    b = torch.arange(tokens.shape[0]).repeat_interleave(len(positions))
    acc.add(model, hook, splices, tokens, (b, positions.repeat(tokens.shape[0])))
    return acc.result()


# ---- over a token cache ---------------------------------------------------------------------------------------
def scored_per_window(plan: WindowPlan, bos: bool) -> np.ndarray:
    """Scored predictions of each window: its cached target tokens, less one made at model position 0."""
    first_target = np.maximum(plan.keep_from, 2 - int(bos))  # in document tokens; model position = + bos
    return np.maximum(plan.length - first_target, 0)


def ablation_plan(token_cache: TokenCache, split: str, *, max_text_length: int, prepend_bos: bool, overlap: int,
                  max_tokens: int | None, documents: np.ndarray | None = None) -> WindowPlan:
    """The activation cache's windows over one split's documents (only `documents`, when given: those the
    other figures were computed on), cut to at most `max_tokens` scored predictions (whole windows, in
    document order; at least one window)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {sorted(SPLIT_NAMES)}, got {split!r}")
    chosen = token_cache.split == SPLIT_NAMES[split]
    if documents is not None:
        chosen &= np.isin(np.arange(len(chosen)), documents)
    lengths = np.where(chosen, token_cache.lengths(), 0)
    plan = plan_windows(lengths, max_text_length - int(prepend_bos), overlap, prepend_bos, max_tokens)
    scored = scored_per_window(plan, prepend_bos)
    keep = scored > 0  # a one-token document with BOS: cached, but its only prediction is made at position 0
    if max_tokens is not None:
        keep &= np.cumsum(scored) <= max(max_tokens, int(scored[keep][:1].sum()))  # at least one window
    return plan.select(keep)


def evaluate_ablation(
    model: Any,
    hook: HookSpec,
    sae: SparseAutoencoder,
    token_cache: TokenCache,
    plan: WindowPlan,
    *,
    bos_id: int | None,
    token_budget: int,
    mean: Tensor | np.ndarray | None = None,
    pad_id: int = 0,
    progress: bool = True,
    split: bool = True,
    on_estimate: Callable[[int, float], None] | None = None,
) -> dict[str, float | int]:
    """Every figure above over the planned windows, batched up to `token_budget` padded positions.

    Padding sits after each window's end and is never scored (the model is causal). After the first batch,
    `on_estimate(predictions, seconds)` hears the whole pass's size and its time at that batch's speed.
    """
    splices = replacements(sae, mean)
    acc = AblationAccumulator(splices, split=split)
    device = model_device(model)
    bos = bos_id is not None
    lengths = plan.length + int(bos)
    total = int(scored_per_window(plan, bos).sum())
    with tqdm(total=total, desc="ablation", unit="tok", unit_scale=True, disable=not progress) as bar:
        for batch in batch_windows(lengths, token_budget):
            started = time.perf_counter()
            wb = build_batch(plan, batch, token_cache, bos_id, pad_id)
            rows, targets = wb.row_select
            scored = targets >= 2  # the prediction of a target at model position p is made at p - 1 >= 1
            before = acc.tokens
            acc.add(model, hook, splices, wb.tokens.to(device), (rows[scored], targets[scored] - 1))
            bar.update(acc.tokens - before)
            if on_estimate is not None and before == 0 and acc.tokens > 0:
                on_estimate(total, (time.perf_counter() - started) * total / acc.tokens)
    result = acc.result()
    result["windows"] = len(plan)
    result["documents"] = len(np.unique(plan.doc))
    return result
