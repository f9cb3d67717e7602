"""Matryoshka SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders").

BatchTopK selection, but the loss sums the reconstruction error of every nested prefix of the
dictionary: latents [0, m_1), [0, m_2), ..., [0, d_sae). The first latents must reconstruct well on
their own, so they learn general, high-level features, and later latents refine them instead of
absorbing them (feature absorption/splitting). Inference is BatchTopK's: one running threshold.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Self

import torch
from torch import Tensor

from saepipe.errors import field_error
from saepipe.kernels import BatchSums, SparseCodes, decode_sparse
from saepipe.sae.base import Knobs, decoded_mse
from saepipe.sae.batch_topk import BatchTopKConfig, BatchTopKSAE
from saepipe.sae_types import register


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    matryoshka_prefixes: list[int] = field(default_factory=list)
    """Nested dictionary sizes (increasing, each < d_sae); d_sae itself is always the last prefix."""

    @classmethod
    def from_params(cls, knobs: Knobs, d_in: int) -> Self:
        top_k = BatchTopKConfig.from_params(knobs, d_in)
        d_sae = top_k.d_sae
        fractions = knobs["matryoshka_prefix_fractions"]
        prefixes = [round(f * d_sae) for f in fractions]
        if not prefixes or prefixes[0] < 1 or len(set(prefixes)) < len(prefixes) or prefixes[-1] >= d_sae:
            raise field_error("train.matryoshka_prefix_fractions", fractions,
                              f"fractions giving distinct prefix sizes in [1, {d_sae - 1}] for d_sae {d_sae}")
        return cls(d_in=d_in, d_sae=d_sae, k_aux=top_k.k_aux, k=top_k.k, matryoshka_prefixes=prefixes)


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig):
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
