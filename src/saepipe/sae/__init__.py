"""Sparse autoencoders: one module per architecture (its config, forward and training rules), filed under
its name in `saepipe.sae_types` by `@register` when imported here."""

from saepipe.sae import batch_topk, jumprelu, matryoshka, standard, topk  # noqa: F401  (registers the architectures)
from saepipe.sae.base import (
           SAEConfig,
           SAEOutput,
           SparseAutoencoder,
           build_sae,
           config_class,
           config_from_dict,
           config_from_params,
           sae_config,
)
from saepipe.sae_types import REGISTRY

__all__ = ["REGISTRY", "SAEConfig", "SAEOutput", "SparseAutoencoder", "build_sae", "config_class",
           "config_from_dict", "config_from_params", "sae_config"]
