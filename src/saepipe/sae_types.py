"""The SAE architectures by name: the one list of `sae_type`s (params, `--help`, both export formats).

It sits at the bottom of the package, importing nothing, so that the config offers the names without importing
any architecture (the stages before training never load the SAE code, and dvc.yaml does not rerun them when it
changes). Architecture `name` lives in `sae/<name>.py`, which files its class here with `@register(name)` when
`saepipe.sae` imports it; adding one is that module and its name below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SAE_TYPES: tuple[str, ...] = ("batch_topk", "topk", "matryoshka", "standard", "jumprelu")

REGISTRY: dict[str, Any] = {}
"""sae_type -> the `SparseAutoencoder` subclass, filled as `saepipe.sae` imports the architectures."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: file the architecture under `name` and name its config class after it."""

    def add(cls: type) -> type:
        if name not in SAE_TYPES:
            raise ValueError(f"sae_type {name!r} is not in saepipe.sae_types.SAE_TYPES; add it there")
        if name in REGISTRY:
            raise ValueError(f"sae_type {name!r} is registered twice")
        config_class = cls.__dict__.get("config_class")
        if config_class is None or config_class.__dict__.get("arch"):
            raise TypeError(f"{cls.__name__} needs a config class of its own")
        cls.arch = config_class.arch = name
        REGISTRY[name] = cls
        return cls

    return add
