"""Matryoshka SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders").

BatchTopK selection, but the loss sums the reconstruction error of every nested prefix of the
dictionary: latents [0, m_1), [0, m_2), ..., [0, d_sae). The first latents must reconstruct well on
their own, so they learn general, high-level features, and later latents refine them instead of
absorbing them (feature absorption/splitting). Inference is BatchTopK's: one running threshold.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from saepipe.kernels import BatchSums, SparseCodes, decode_sparse
from saepipe.sae.base import SAEConfig, decoded_mse, register
from saepipe.sae.batch_topk import BatchTopKSAE


@register
class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        prefixes = [int(m) for m in cfg.matryoshka_prefixes]
        bounds = [0, *prefixes, cfg.d_sae]
        if any(hi <= lo for lo, hi in itertools.pairwise(bounds)):
            raise ValueError(f"matryoshka_prefixes must increase strictly within (0, d_sae={cfg.d_sae}): "
                             f"{cfg.matryoshka_prefixes}")
        self.prefix_ends = [*prefixes, cfg.d_sae]  # exclusive end of each nested dictionary

    def reconstruction(self, x: Tensor, codes: SparseCodes) -> tuple[Tensor, Tensor, BatchSums]:
        """Sum of the prefix MSEs; each band [m_{i-1}, m_i) is decoded once and added to the running sum."""
        ends = torch.tensor(self.prefix_ends, device=codes.cols.device)
        band = torch.bucketize(codes.cols, ends, right=True)  # band i holds m_{i-1} <= col < m_i
        decoded = torch.zeros_like(x)
        loss = torch.zeros((), dtype=x.dtype, device=x.device)
        for i in range(len(self.prefix_ends)):
            decoded = decoded + decode_sparse(codes.subset(band == i), self.W_dec)
            x_hat, prefix_loss, sums = decoded_mse(decoded, self.b_dec, x)
            loss = loss + prefix_loss
        return x_hat, loss, sums
