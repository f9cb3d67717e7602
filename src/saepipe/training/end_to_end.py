"""End-to-end SAE losses: splice the reconstruction into the model and compare what comes out.

After Braun et al. (2024), "Identifying Functionally Important Features with End-to-End Sparse
Dictionary Learning": a low reconstruction MSE does not mean the model computes the same thing from
the reconstruction, so we also penalise how much the spliced model's next-token distribution
(`logit_kl`) and its later residual stream (`block_mse`) move away from the clean model's.

Two forward passes per batch: a clean one without autograd, and a spliced one in which
`blocks.<layer>.<hook>` is replaced by the SAE's reconstruction at positions >= 1. Position 0 (the
attention sink, or BOS) is left alone: the SAE never sees it in training (its norm is ~100x the rest),
and since the model is causal its outputs are unaffected either way, so it is left out of every average.
Gradients reach the SAE only; the base model's parameters are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saepipe.corpus.tokens import SPLIT_NAMES, TokenCache
from saepipe.errors import UserError
from saepipe.model.hooks import HookSpec
from saepipe.model.loading import model_device
from saepipe.model.splice import splice_hook
from saepipe.sae import SparseAutoencoder

RESID_POST = "hook_resid_post"


@dataclass
class EndToEndLosses:
    """Loss terms as scalar tensors (differentiable w.r.t. the SAE; zero when off) and figures to log."""

    logit_kl: Tensor
    block_mse: Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    def weighted(self, logit_kl_weight: float, block_mse_weight: float) -> Tensor:
        return logit_kl_weight * self.logit_kl + block_mse_weight * self.block_mse


def freeze_model(model: torch.nn.Module) -> None:
    """Turn off gradients for every base-model parameter.

    The bridge loads weights with requires_grad=True; left so, the spliced pass would build a graph
    through every weight and backward() would fill (and keep) gradients the size of the model.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.requires_grad_(False)


def end_to_end_losses(
    model: Any,
    hook: HookSpec,
    sae: SparseAutoencoder,
    scale: float,
    tokens: Tensor,
    *,
    logit_kl: bool = True,
    block_mse: bool = False,
) -> EndToEndLosses:
    """KL and downstream-residual losses of splicing `sae` in at `hook`, for unpadded windows [B, T].

    The SAE works on `scale * x`; its reconstruction is divided by `scale` before it goes back in.

    `logit_kl`: KL(clean || spliced) of the next-token distributions, summed over the vocabulary and
    averaged over positions >= 1.

    `block_mse`: for each block l after the hook's layer, the squared error of the spliced residual
    `blocks.l.hook_resid_post`, summed over d_model and averaged over positions >= 1, divided by the
    clean residual's mean squared norm over the same positions (equivalently mean((s - c)^2) / mean(c^2)
    elementwise). That makes it scale-free: the fraction of the residual's energy the splice perturbs,
    comparable across blocks whose norms grow with depth and across models. Reported per block as
    `block_mse_layer{l}`, summed over blocks as `total_post_layer_mse`, and averaged as `block_mse`
    (the loss term). With the hook in the last block there are no later blocks and it is 0.

    The clean pass stops after the last later block when the logits are not needed; so does the spliced one.
    """
    if not (logit_kl or block_mse):
        raise ValueError("end_to_end_losses: turn on logit_kl, block_mse or both")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, seq] with seq >= 2, got shape {tuple(tokens.shape)}")
    freeze_model(model)
    n_layers = int(model.cfg.n_layers)
    later = list(range(hook.layer + 1, n_layers)) if block_mse else []
    device = next(sae.parameters()).device
    zero = torch.zeros((), device=device)
    if not logit_kl and not later:
        return EndToEndLosses(zero, zero, {"block_mse": 0.0, "total_post_layer_mse": 0.0})
    stop_after = None if logit_kl else later[-1]
    tokens = tokens.to(device=model_device(model), dtype=torch.long)

    with torch.no_grad():
        clean_logits, clean_resid = _run(model, tokens, later, stop_after, n_layers)

    def reconstruct(x: Tensor) -> Tensor:
        return sae(x.to(device=device, dtype=torch.float32) * scale).x_hat / scale

    splice = splice_hook(reconstruct)
    spliced_logits, spliced_resid = _run(model, tokens, later, stop_after, n_layers, (hook.full_name, splice))

    metrics: dict[str, float] = {}
    kl = zero
    if logit_kl:
        log_p = F.log_softmax(clean_logits[:, 1:].float(), dim=-1)
        log_q = F.log_softmax(spliced_logits[:, 1:].float(), dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean().to(device)
        metrics["logit_kl"] = float(kl.detach())
    mse = zero
    if block_mse:
        per_layer = []
        for layer in later:
            clean = clean_resid[layer][:, 1:].float()
            spliced = spliced_resid[layer][:, 1:].float()
            value = ((spliced - clean).pow(2).mean() / clean.pow(2).mean().clamp_min(1e-12)).to(device)
            per_layer.append(value)
            metrics[f"block_mse_layer{layer}"] = float(value.detach())
        mse = torch.stack(per_layer).mean() if per_layer else zero
        metrics["block_mse"] = float(mse.detach())
        metrics["total_post_layer_mse"] = float(sum(per_layer).detach()) if per_layer else 0.0
    return EndToEndLosses(kl, mse, metrics)


def _run(
    model: Any,
    tokens: Tensor,
    layers: list[int],
    stop_after: int | None,
    n_layers: int,
    splice: tuple[str, Callable[..., Tensor]] | None = None,
) -> tuple[Tensor | None, dict[int, Tensor]]:
    """(logits or None, residual after each of `layers`); raising StopAtLayerException from the last
    capture skips the rest of the model (ln_final and the unembedding are costly with a large vocab)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    captured: dict[int, Tensor] = {}

    def capture(layer: int) -> Callable[..., None]:
        def grab(activation: Tensor, hook: Any) -> None:
            captured[layer] = activation
            if layer == stop_after:
                raise StopAtLayerException(activation)

        return grab

    fwd_hooks = [splice] if splice is not None else []
    fwd_hooks += [(HookSpec(layer, RESID_POST).full_name, capture(layer)) for layer in layers]
    # stop_at_layer=n_layers stops nothing by itself, but makes the bridge clean up after our early stop
    # (it resets its per-block stop flags and drops a possibly incomplete KV cache).
    output = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, reset_hooks_end=True,
                                  stop_at_layer=n_layers if stop_after is not None else None)
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise RuntimeError(f"hooks {[HookSpec(m, RESID_POST).full_name for m in missing]} never fired")
    return (None if stop_after is not None else output), captured



def sample_windows(
    token_cache: TokenCache,
    split: str,
    n_windows: int,
    window: int,
    rng: np.random.Generator,
    *,
    bos_id: int | None = None,
) -> Tensor:
    """Random document-aligned windows [n_windows, window] (int64) for end-to-end batches.

    Windows never cross a document boundary and are never padded: each is drawn uniformly from all
    full-length windows of the split's documents (so long documents contribute in proportion to their
    length). With `bos_id`, position 0 is BOS and `window - 1` document tokens follow, as in the
    activation cache. If no document is long enough, the windows shrink to the longest document.
    Deterministic given `rng`'s state.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {sorted(SPLIT_NAMES)}, got {split!r}")
    n = window - int(bos_id is not None)
    if n < 1 or n_windows < 1:
        raise ValueError(f"need window > {int(bos_id is not None)} and n_windows >= 1, got {window}, {n_windows}")
    docs = np.flatnonzero(token_cache.split == SPLIT_NAMES[split])
    lengths = token_cache.lengths()[docs]
    if len(docs) == 0 or lengths.max() == 0:
        raise UserError(f"the token cache has no {split} tokens to draw end-to-end windows from")
    n = min(n, int(lengths.max()))
    keep = lengths >= n
    docs, starts_per_doc = docs[keep], lengths[keep] - n + 1
    bounds = np.cumsum(starts_per_doc)
    picks = rng.integers(0, int(bounds[-1]), size=n_windows)
    which = np.searchsorted(bounds, picks, side="right")
    offsets = picks - (bounds[which] - starts_per_doc[which])
    out = np.empty((n_windows, n + int(bos_id is not None)), dtype=np.int64)
    if bos_id is not None:
        out[:, 0] = bos_id
    for i, (doc, start) in enumerate(zip(docs[which].tolist(), offsets.tolist(), strict=True)):
        out[i, int(bos_id is not None):] = token_cache.document(doc)[start : start + n]
    return torch.from_numpy(out)


def make_end_to_end_loss(
    model: Any,
    hook: HookSpec,
    token_cache: TokenCache,
    *,
    n_windows: int,
    window: int,
    logit_kl: bool,
    block_mse: bool,
    logit_kl_weight: float,
    block_mse_weight: float,
    seed: int,
    bos_id: int | None = None,
) -> Callable[[SparseAutoencoder, float, int], tuple[Tensor, dict[str, float]]]:
    """The trainer's `(sae, scale, step) -> (weighted loss, figures)` callable.

    Each step draws fresh training windows from a generator seeded by (seed, step), so a resumed run
    sees the same windows as an uninterrupted one.
    """
    freeze_model(model)

    def loss(sae: SparseAutoencoder, scale: float, step: int) -> tuple[Tensor, dict[str, float]]:
        tokens = sample_windows(token_cache, "train", n_windows, window, np.random.default_rng([seed, step]),
                                bos_id=bos_id)
        out = end_to_end_losses(model, hook, sae, scale, tokens, logit_kl=logit_kl, block_mse=block_mse)
        figures = dict(out.metrics)
        if logit_kl:
            figures["kl_contribution"] = logit_kl_weight * figures["logit_kl"]
        if block_mse:
            figures["block_mse_contribution"] = block_mse_weight * figures["block_mse"]
        return out.weighted(logit_kl_weight, block_mse_weight), figures

    return loss
