"""Replace a hook's activations at positions >= 1 with something computed from them; position 0 stays.

Shared by end-to-end training (the SAE's reconstruction, with gradients) and the evaluate stage's ablations
(reconstruction, zero, mean, reconstruction plus error), so every splice treats position 0 the same way:
the attention sink (or BOS) has a residual norm ~100x the rest, no SAE ever sees it, and the model is
causal, so leaving it alone changes nothing at it and everything after it sees an untouched sink.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Replacement = Callable[[Tensor], Tensor]
"""rows [n, d_model] (the hook's dtype and device) -> their replacement [n, d_model] (any float dtype/device)."""


def spliced(activation: Tensor, replace: Replacement) -> Tensor:
    """`activation` [batch, seq, d_model] with positions >= 1 swapped for `replace(rows)`, rows flattened
    batch-major; cast back to the activation's dtype and device; autograd flows through it."""
    x = activation[:, 1:]
    new = replace(x.reshape(-1, x.shape[-1]))
    new = new.reshape(x.shape).to(device=activation.device, dtype=activation.dtype)
    return torch.cat([activation[:, :1], new], dim=1)


def splice_hook(replace: Replacement) -> Callable[[Tensor, Any], Tensor]:
    """A TransformerLens forward hook that applies `spliced` at the hook."""

    def hook(activation: Tensor, hook: Any) -> Tensor:
        return spliced(activation, replace)

    return hook
