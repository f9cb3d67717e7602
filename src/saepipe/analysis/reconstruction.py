"""How well an SAE reconstructs raw activations x with x_hat = decode(encode(x)), over N tokens of d_in dims.

    mse                  Σ‖x − x̂‖² / (N · d_in)                       (mean over tokens and dimensions)
    fvu                  Σ‖x − x̂‖² / Σ‖x − mean(x)‖²                  mean(x): per-dimension mean of the N tokens
    explained_variance   1 − fvu
    cos_sim              mean over tokens of ⟨x, x̂⟩ / (‖x‖ ‖x̂‖)
    l2_ratio             mean over tokens of ‖x̂‖ / ‖x‖
    relative_reconstruction_bias   E‖x̂‖² / E⟨x, x̂⟩                  (1: unbiased; < 1: shrinkage)

Sums are float64 and streamed over all tokens (never averaged per batch). The total variance is merged
batch by batch with Chan et al.'s pairwise update (each batch's own mean and squared deviations), which
stays exact where Σ‖x‖² − N‖mean‖² would cancel catastrophically on residual streams with a large mean.

One call on a loaded SAE and a batch of raw activations:

    from saepipe.analysis.reconstruction import reconstruction_metrics, fvu
    figures = reconstruction_metrics(sae, x)  # dict of the figures above, plus tokens
    value = fvu(sae, x)

Streaming: `acc = ReconstructionAccumulator()`, `acc.add(x, x_hat)` per batch, `acc.result()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saepipe.sae import SparseAutoencoder

FORMULAS = {
    "mse": "sum ||x - x_hat||^2 / (N * d_in)",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean(x) per dimension over the N evaluated tokens, "
           "float64 sums over all tokens",
    "explained_variance": "1 - fvu",
    "cos_sim": "mean over tokens of <x, x_hat> / (||x|| ||x_hat||)",
    "l2_ratio": "mean over tokens of ||x_hat|| / ||x||",
    "relative_reconstruction_bias": "E||x_hat||^2 / E<x, x_hat>",
}


class ReconstructionAccumulator:
    def __init__(self) -> None:
        self.tokens = 0
        self.d_in = 0
        self.mean: Tensor | None = None  # float64 [d_in], running mean of x
        self.deviation_sq = 0.0  # Σ‖x − mean(x)‖² over the tokens so far
        self.error_sq = 0.0
        self.cos_sum = 0.0
        self.l2_ratio_sum = 0.0
        self.x_hat_sq = 0.0
        self.x_dot_x_hat = 0.0

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor) -> None:
        """One batch of raw activations x [tokens, d_in] and their reconstructions."""
        n = x.shape[0]
        if n == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        batch_mean = x.mean(0)
        batch_deviation_sq = float((x - batch_mean).pow(2).sum())
        if self.mean is None:
            self.mean, self.deviation_sq, self.d_in = batch_mean, batch_deviation_sq, x.shape[1]
        else:
            delta = batch_mean - self.mean.to(batch_mean.device)
            total = self.tokens + n
            self.deviation_sq += batch_deviation_sq + float(delta.pow(2).sum()) * self.tokens * n / total
            self.mean = self.mean.to(batch_mean.device) + delta * (n / total)
        self.tokens += n
        self.error_sq += float((x - x_hat).pow(2).sum())
        self.cos_sum += float(F.cosine_similarity(x, x_hat, dim=1).sum())
        x_norm = torch.linalg.vector_norm(x, dim=1)
        x_hat_norm = torch.linalg.vector_norm(x_hat, dim=1)
        self.l2_ratio_sum += float((x_hat_norm / x_norm.clamp_min(1e-12)).sum())
        self.x_hat_sq += float(x_hat_norm.pow(2).sum())
        self.x_dot_x_hat += float((x * x_hat).sum())

    def result(self) -> dict[str, float | int]:
        if self.tokens == 0:
            raise ValueError("no tokens were added")
        fvu = self.error_sq / self.deviation_sq if self.deviation_sq > 0 else float("nan")
        return {
            "tokens": self.tokens,
            "mse": self.error_sq / (self.tokens * self.d_in),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cos_sim": self.cos_sum / self.tokens,
            "l2_ratio": self.l2_ratio_sum / self.tokens,
            "relative_reconstruction_bias": (self.x_hat_sq / self.x_dot_x_hat if self.x_dot_x_hat != 0
                                             else float("nan")),
        }


# ---- one call on a loaded SAE and a batch of raw activations ------------------------------------------------
@torch.no_grad()
def reconstruct(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(features, x_hat) of raw activations x [tokens, d_in], through the SAE's inference path."""
    x = x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    features = sae.encode(x)
    return features, sae.decode(features)


def reconstruction_metrics(sae: SparseAutoencoder, x: Tensor) -> dict[str, float | int]:
    """Every figure above for raw activations x [tokens, d_in]."""
    _, x_hat = reconstruct(sae, x)
    acc = ReconstructionAccumulator()
    acc.add(x.to(x_hat.device), x_hat)
    return acc.result()


def fvu(sae: SparseAutoencoder, x: Tensor) -> float:
    """Fraction of the variance of raw activations x [tokens, d_in] that the SAE leaves unexplained."""
    return float(reconstruction_metrics(sae, x)["fvu"])
