"""Run the model once up to a hook, then only the blocks above it, as often as needed, from any replacement.

The evaluate stage's ablation runs the model clean and with four splices at one hook; below the hook all
five runs are the same. TransformerBridge (TransformerLens 3) stops at a layer (`stop_at_layer`) but does not
start at one: HF's model owns the layer loop. So the lower run stops at the first block above the hook and
records what that block is handed besides the residual stream (the attention mask, position ids, the
rotary cos/sin: all computed from the token ids alone, so the same for every replacement); the continuation
calls the remaining blocks with them, then the final norm and the unembedding, the latter two only at the
positions that are scored.

    split = SplitForward(model, HookSpec(15, "hook_resid_post"))   # None-safe: SplitForward.supports(...)
    lower = split.lower(tokens)                # the hook's activation [batch, seq, d_model], and the rest
    final = split.residuals(lower, [lower.activation, replaced])      # both continuations in one batch
    logits = split.head(final[:batch], rows, positions)               # [n, vocab] at (rows, positions)

Hooks whose replacement determines the next block's input: `hook_resid_pre` (it is that block's input),
`hook_resid_post` (the input of the block above) and `hook_mlp_out` (the block's output is resid_mid +
mlp_out). Any other hook (inside attention, resid_mid, ...) is not split: callers run full forwards.
`agrees` checks, once per model and hook, on the start of one window, that continuing from the untouched
activation gives the full forward's logits: it catches an architecture whose head does more than norm +
unembedding (e.g. soft-capping).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saepipe.model.hooks import HookSpec

SPLIT_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")
CHECK_POSITIONS = 64
_AGREES: weakref.WeakKeyDictionary[Any, dict[HookSpec, bool]] = weakref.WeakKeyDictionary()


@dataclass
class Lower:
    """What the lower run leaves for the continuation."""

    activation: Tensor          # the hook's activation [batch, seq, d_model]
    block_kwargs: dict[str, Any]  # what the first block above is handed besides the residual
    resid_mid: Tensor | None    # hook_mlp_out only: the residual the MLP's output is added to


class SplitForward:
    def __init__(self, model: Any, hook: HookSpec):
        if not self.supports(model, hook):
            raise ValueError(f"{hook} cannot be split: only {', '.join(SPLIT_HOOKS)} of a block are")
        self.model = model
        self.hook = hook
        # The first block that runs after the hook's value is known: the hooked block itself for resid_pre.
        self.start = hook.layer if hook.name == "hook_resid_pre" else hook.layer + 1

    @staticmethod
    def supports(model: Any, hook: HookSpec) -> bool:
        return (hook.name in SPLIT_HOOKS and hook.full_name in getattr(model, "hook_dict", {})
                and all(hasattr(model, name) for name in ("blocks", "ln_final", "unembed"))
                and (hook.name != "hook_mlp_out" or f"blocks.{hook.layer}.hook_resid_mid" in model.hook_dict))

    @torch.inference_mode()
    def lower(self, tokens: Tensor) -> Lower:
        """Run `tokens` [batch, seq] up to the first block above the hook, and stop there."""
        model, captured = self.model, {}
        names = [self.hook.full_name]
        if self.hook.name == "hook_mlp_out":
            names.append(f"blocks.{self.hook.layer}.hook_resid_mid")

        def keep(name: str):
            def fn(module: Any, inputs: Any, output: Tensor) -> None:
                captured[name] = output
            return fn

        def keep_kwargs(module: Any, args: tuple, kwargs: dict) -> None:
            captured["kwargs"] = dict(kwargs)

        def stop_at_head(module: Any, args: tuple) -> None:
            from transformer_lens.model_bridge.exceptions import StopAtLayerException

            raise StopAtLayerException(args[0])  # the bridge's forward catches it and returns

        handles = [model.hook_dict[name].register_forward_hook(keep(name)) for name in names]
        try:
            if self.start < len(model.blocks):
                handles.append(model.blocks[self.start].register_forward_pre_hook(keep_kwargs, with_kwargs=True))
                model(tokens, stop_at_layer=self.start, use_cache=False)
            else:  # the last block's output: stop before the final norm
                handles.append(model.ln_final.register_forward_pre_hook(stop_at_head))
                model(tokens, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        kwargs = captured.get("kwargs", {})
        for name in ("past_key_values", "past_key_value", "cache"):
            if name in kwargs:
                kwargs[name] = None  # nothing may be appended to a cache between continuations
        return Lower(captured[self.hook.full_name], kwargs,
                     captured.get(f"blocks.{self.hook.layer}.hook_resid_mid"))

    @torch.inference_mode()
    def residuals(self, lower: Lower, activations: Sequence[Tensor]) -> Tensor:
        """The final residual stream [k * batch, seq, d_model] with each of k activations (the hook's own, or
        replacements of it) at the hook: the k continuations run as one batch, variant after variant."""
        model, k, batch = self.model, len(activations), lower.activation.shape[0]
        residual = torch.cat([a if lower.resid_mid is None else lower.resid_mid + a for a in activations])
        kwargs = {name: _tile(value, batch, k) for name, value in lower.block_kwargs.items()}
        for block in model.blocks[self.start:]:
            out = block(residual, **kwargs)
            residual = out[0] if isinstance(out, tuple) else out
        return residual

    @torch.inference_mode()
    def head(self, residual: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
        """The logits [n, vocab] at (rows, positions) of one final residual [batch, seq, d_model]."""
        return self.model.unembed(self.model.ln_final(residual[rows, positions]))

    def logits(self, lower: Lower, activation: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
        """The logits [n, vocab] at (rows, positions) with `activation` (or a replacement of it) at the hook."""
        return self.head(self.residuals(lower, [activation]), rows, positions)

    def agrees(self, tokens: Tensor) -> bool:
        """Whether continuing from the untouched activation gives the full forward's logits, on the start of
        one window (`CHECK_POSITIONS`); checked once per model and hook."""
        known = _AGREES.setdefault(self.model, {})
        if self.hook not in known:
            known[self.hook] = self._agrees(tokens[:1, :CHECK_POSITIONS])
        return known[self.hook]

    @torch.inference_mode()
    def _agrees(self, window: Tensor) -> bool:
        positions = torch.arange(window.shape[1], device=window.device)
        rows = torch.zeros_like(positions)
        lower = self.lower(window)
        want = self.model(window)[0]
        # Two continuations in one batch, as the ablation runs them. Rounding differs only where a product's
        # shape does: an ulp or two of the logits' dtype. A missing step (soft-capping, a logit scale, another
        # mask) moves them by far more.
        tol = max(4 * torch.finfo(want.dtype).eps, 1e-5) * (float(want.float().abs().max()) + 1.0)
        for residual in self.residuals(lower, [lower.activation, lower.activation]).split(1):
            got = self.head(residual, rows, positions)
            if got.shape != want.shape or float((got.float() - want.float()).abs().max()) > tol:
                return False
        return True


def _tile(value: Any, batch: int, k: int) -> Any:
    """A block's keyword argument for k stacked copies of the batch: tensors of >= 2 dimensions that are
    per row (the attention mask, position ids when given per row) tiled k times; the rest as they are."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == batch and k > 1:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    if isinstance(value, tuple):
        return tuple(_tile(v, batch, k) for v in value)
    return value
