"""Sparse autoencoders: one module per architecture, plugged into a registry by `@register`."""

from saepipe.sae import batch_topk, jumprelu, matryoshka, standard, topk  # noqa: F401  (registers the architectures)
from saepipe.sae.base import REGISTRY, SAEConfig, SAEOutput, SparseAutoencoder, build_sae

__all__ = ["REGISTRY", "SAEConfig", "SAEOutput", "SparseAutoencoder", "build_sae"]
