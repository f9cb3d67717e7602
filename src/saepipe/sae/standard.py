"""Standard ReLU SAE with an L1 penalty weighted by decoder row norm.

Bricken et al. 2023 ("Towards Monosemanticity") with the penalty of Anthropic's April 2024 update
("Training Sparse Autoencoders"): sum_j f_j * ||W_dec[j]||. Weighting by the row norm makes the penalty
blind to trading encoder scale for decoder scale, so the SAE cannot dodge it by shrinking activations
and growing decoder rows. With unit rows it is plain L1; using the actual norms keeps it correct whether
or not the trainer holds the decoder at unit norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from saepipe.kernels import SparseCodes
from saepipe.sae.base import SAEConfig, SparseAutoencoder
from saepipe.sae_types import register


@dataclass(frozen=True)
class StandardConfig(SAEConfig):
    saelens_architecture = "standard"


@register("standard")
class StandardSAE(SparseAutoencoder):
    """Trained densely: a ReLU code has no fixed sparsity for the sparse kernels to exploit."""

    config_class = StandardConfig
    sparse_training = False

    def dense_features(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def inference_features(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def sparsity_loss(self, codes: SparseCodes, pre: Tensor) -> Tensor:
        """Mean over tokens of sum_j f_j ||W_dec[j]|| (differentiable in both f and W_dec)."""
        norms = self.W_dec.norm(dim=1)
        return (codes.values * norms[codes.cols]).sum() / codes.n_rows
