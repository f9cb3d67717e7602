"""saepipe: a data-versioned pipeline that trains sparse autoencoders on a language model's activations."""

from __future__ import annotations

from typing import Any

from saepipe.version import VERSION as __version__

__all__ = ["ActivationDB", "__version__", "load_sae"]


def __getattr__(name: str) -> Any:
    """`saepipe.load_sae` and `saepipe.ActivationDB` on first use: `import saepipe` stays cheap (no torch)
    for the CLI and DVC."""
    if name == "load_sae":
        from saepipe.sae.formats import load_sae

        return load_sae
    if name == "ActivationDB":
        from saepipe.analysis.activation_db import ActivationDB

        return ActivationDB
    raise AttributeError(f"module 'saepipe' has no attribute {name!r}")
