"""Pure helpers the tests call on values they already hold (params, sizes); fixtures live in conftest.py.

These are plain functions, not fixtures, because helper functions inside test modules call them (run_process,
train_config, zero_sae, ...) and module-scoped fixtures build on them: as fixtures they would have to be
threaded through every such helper's signature, with no setup, state or teardown to justify it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def with_section(params, section: str, **changes):
    """A copy of `params` with fields of one section replaced (validated like params.yaml)."""
    from saepipe.config import replace_values

    return dataclasses.replace(params, **{section: replace_values(getattr(params, section), **changes)})


def identity_sae(d: int = 64):
    """An SAE with x_hat == x exactly: features [relu(x), relu(-x)] decoded by [I; -I] (ReLU needs both signs)."""
    import torch

    from saepipe.sae import build_sae, sae_config

    sae = build_sae(sae_config("topk", d_in=d, d_sae=2 * d, k=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def write_params(params, path: Path) -> str:
    """`params` as a complete params file at `path` (for `saepipe <stage> --params`); returns the path."""
    import yaml

    path.write_text(yaml.safe_dump(params.to_dict()))
    return str(path)
