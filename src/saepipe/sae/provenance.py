"""Where an SAE came from: the record a training run keeps with its checkpoints, and what a loaded
export knows about the model and hook it was trained on (what `check_compatible` compares)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saepipe.model.hooks import HookSpec


@dataclass(frozen=True)
class RunRecord:
    """Written by `saepipe train` into every checkpoint (state.json's `run`) and by export into config.json."""

    run_name: str
    model_name: str
    hook: HookSpec
    d_in: int
    activation_scale: float
    """Training inputs were `activation_scale * x`; export folds it into the weights."""
    normalize_activations: bool
    prepend_bos: bool
    context_size: int
    train_config: dict[str, Any]
    """The train params as in params.yaml (flat keys)."""
    data: dict[str, Any]
    """The activation cache (path, sha256, attributes) and the rows trained and validated on."""
    code: dict[str, Any]
    """saepipe, torch and git versions of the run."""
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hook": self.hook.full_name}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunRecord:
        """The inverse of `to_dict`; a KeyError, TypeError or ValueError means a record of another format."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"hook"}
        return cls(hook=HookSpec.parse(str(values["hook"])),
                   **{name: values[name] for name in fields if name in values})


@dataclass(frozen=True)
class Provenance:
    """What a loaded export records about its origin (None where the file does not say)."""

    source: Path | None
    model_name: str | None
    hook: HookSpec | None
    config: dict[str, Any]
    """The export's config as written (ours) or cfg.json (SAELens)."""
