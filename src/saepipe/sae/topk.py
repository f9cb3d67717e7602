"""TopK SAE (Gao et al. 2024): each token keeps its own k largest latents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from torch import Tensor

from saepipe.errors import field_error
from saepipe.kernels import SparseCodes, row_top_k
from saepipe.sae.base import Knobs, SAEConfig, SparseAutoencoder
from saepipe.sae_types import register


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    saelens_architecture = "topk"

    k: int = 32
    """Active latents per token (on average over a batch for BatchTopK and Matryoshka)."""

    @classmethod
    def from_params(cls, knobs: Knobs, d_in: int) -> Self:
        d_sae, k = knobs["sae_expansion"] * d_in, knobs["topk"]
        if k >= d_sae:
            raise field_error("train.topk", k, f"an integer below d_sae = {d_sae} "
                              f"(train.sae_expansion {knobs['sae_expansion']} x d_in {d_in})")
        return cls(d_in=d_in, d_sae=d_sae, k_aux=knobs["topk_aux"], k=k)

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}


@register("topk")
class TopKSAE(SparseAutoencoder):
    """Per-row top-k selection in training and at inference."""

    config_class = TopKConfig

    def select(self, pre: Tensor) -> SparseCodes:
        return row_top_k(pre, self.cfg.k)

    def inference_features(self, pre: Tensor) -> Tensor:
        return self.activate(row_top_k(pre, self.cfg.k)).to_dense()
