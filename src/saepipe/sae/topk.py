"""TopK SAE (Gao et al. 2024): each token keeps its own k largest latents."""

from __future__ import annotations

from saepipe.sae.base import SparseAutoencoder, register


@register
class TopKSAE(SparseAutoencoder):
    """Per-row top-k selection in training and at inference (the base class's defaults)."""

    arch = "topk"
