"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

Each latent fires only above its own learned threshold θ: f = z * H(z - θ), and the sparsity penalty is
L0 itself. Both are step functions of θ whose true gradient is zero almost everywhere, so θ is trained
with the paper's straight-through pseudo-derivatives: a rectangle kernel K of width ε (the bandwidth)
smears each jump over a window around θ, and only tokens whose pre-activation falls in that window move
θ. The pre-activations get the ordinary gradient H(z - θ) from the reconstruction and none from L0.
θ is stored as its log so that it stays positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import torch
from torch import Tensor, nn

from saepipe.kernels import SparseCodes
from saepipe.sae.base import Knobs, SAEConfig, SparseAutoencoder
from saepipe.sae_types import register


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    saelens_architecture = "jumprelu"

    jumprelu_bandwidth: float = 0.05
    """Width of the straight-through estimator's window around the threshold."""
    jumprelu_init_threshold: float = 0.01
    """Initial threshold of every latent (in the units the SAE is trained in)."""

    @classmethod
    def from_params(cls, knobs: Knobs, d_in: int) -> Self:
        return cls(d_in=d_in, d_sae=knobs["sae_expansion"] * d_in, k_aux=knobs["topk_aux"],
                   jumprelu_bandwidth=knobs["jumprelu_bandwidth"],
                   jumprelu_init_threshold=knobs["jumprelu_init_threshold"])


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 on (-1/2, 1/2), 0 elsewhere: integrates to 1, so K(u/ε)/ε approximates a Dirac delta."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * H(z - θ); ∂/∂z = H(z - θ), ∂/∂θ := -(θ/ε) K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            window = _rectangle((z - threshold) / eps)
            grad_threshold = -(threshold / eps) * (grad * window).sum(0)
        return grad_z, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """H(z - θ); no gradient to z, ∂/∂θ := -(1/ε) K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = -(1.0 / eps) * (grad * _rectangle((z - threshold) / eps)).sum(0)
        return None, grad_threshold, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Trained densely: which latents fire depends on θ, which is itself being learned."""

    config_class = JumpReLUConfig
    sparse_training = False

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        if cfg.jumprelu_init_threshold <= 0 or cfg.jumprelu_bandwidth <= 0:
            raise ValueError("jumprelu_init_threshold and jumprelu_bandwidth must be positive")
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def dense_features(self, pre: Tensor) -> Tensor:
        return JumpReLUFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def inference_features(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold.detach())

    def sparsity_loss(self, codes: SparseCodes, pre: Tensor) -> Tensor:
        """L0: mean over tokens of the number of latents above threshold (trains θ only)."""
        return StepFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum() / pre.shape[0]

    def inference_threshold(self) -> Tensor:
        return self.threshold

    def set_inference_threshold(self, threshold: Tensor) -> None:
        if bool((threshold < 0).any()):
            raise ValueError("JumpReLU thresholds must be nonnegative")
        self.log_threshold.copy_(threshold.reshape(-1).log())
