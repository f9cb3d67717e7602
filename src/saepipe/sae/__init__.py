"""Sparse autoencoders: one module per architecture (its config, forward and training rules), plugged
into the registry by `@register`."""

from saepipe.sae import batch_topk, jumprelu, matryoshka, standard, topk  # noqa: F401  (registers the architectures)
from saepipe.sae.base import (
           REGISTRY,
           SAEConfig,
           SAEOutput,
           SparseAutoencoder,
           build_sae,
           config_class,
           config_from_dict,
           config_from_params,
           sae_config,
)

__all__ = ["REGISTRY", "SAEConfig", "SAEOutput", "SparseAutoencoder", "build_sae", "config_class",
           "config_from_dict", "config_from_params", "sae_config"]
