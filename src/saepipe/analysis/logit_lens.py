"""The tokens a feature's decoder direction promotes and suppresses, read straight through the unembedding.

    effect[f] = norm_direction(W_dec[f]) @ W_U,   norm_direction(d) = ln_final.w * (d - mean(d) if LayerNorm else d)

The final norm's division by the residual's RMS (or standard deviation) is a positive scalar shared by
every vocabulary entry, and its bias (LayerNorm) adds the same vector whatever the feature, so neither
changes which tokens a direction raises or lowers; only the elementwise scale does, and it is folded in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def unembedding(model: Any) -> tuple[Tensor, Tensor | None, bool]:
    """(W_U [d_model, d_vocab], the final norm's scale [d_model] or None, whether it centres) of a
    TransformerLens model (a HookedTransformer or a TransformerBridge in compatibility mode)."""
    norm = getattr(model, "ln_final", None)
    scale = getattr(norm, "w", None) if norm is not None else None
    kind = str(getattr(model.cfg, "normalization_type", "") or "")
    return model.W_U.detach().float(), None if scale is None else scale.detach().float(), kind.startswith("LN")


@torch.no_grad()
def logit_effects(W_dec: Tensor, W_U: Tensor, scale: Tensor | None, center: bool, k: int, block: int = 256
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, their logit effects, suppressed ids, theirs), each [d_sae, k], strongest first;
    computed `block` features at a time so the [d_sae, d_vocab] product never exists whole."""
    k = min(k, W_U.shape[1])
    top_ids, top_values, bottom_ids, bottom_values = [], [], [], []
    for start in range(0, W_dec.shape[0], block):
        directions = W_dec[start : start + block].float()
        if center:
            directions = directions - directions.mean(dim=1, keepdim=True)
        if scale is not None:
            directions = directions * scale
        effects = directions @ W_U
        high = effects.topk(k, dim=1)
        low = effects.topk(k, dim=1, largest=False)
        top_ids.append(high.indices)
        top_values.append(high.values)
        bottom_ids.append(low.indices)
        bottom_values.append(low.values)
    return torch.cat(top_ids), torch.cat(top_values), torch.cat(bottom_ids), torch.cat(bottom_values)
