"""Where in the model the SAE looks: `blocks.<layer>.<hook_name>`, with the middle layer as default."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from saepipe.errors import UserError, field_error

HOOK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class HookSpec:
    """A hook inside a block: `layer` 15 and `name` hook_resid_post is TransformerLens's
    `blocks.15.hook_resid_post`. Files record it as that one string (the `hook` attribute or key); this class
    is the one place the string is made (`full_name`) and read (`parse`)."""

    layer: int
    name: str

    @classmethod
    def parse(cls, full_name: str) -> HookSpec:
        match = HOOK_RE.fullmatch(full_name)
        if match is None:
            raise ValueError(f"{full_name!r} is not a hook inside a block (blocks.<layer>.<name>)")
        return cls(int(match.group(1)), match.group(2))

    @property
    def full_name(self) -> str:
        return f"blocks.{self.layer}.{self.name}"

    def __str__(self) -> str:
        return self.full_name

    @property
    def stop_at_layer(self) -> int:
        """Blocks to run (0..layer) before every later block can be skipped."""
        return self.layer + 1


def middle_layer(n_layers: int, strategy: Literal["lower", "upper"]) -> int:
    """The middle layer; with an even count there are two, and `strategy` picks one."""
    if n_layers < 1:
        raise UserError(f"model has {n_layers} layers: nothing to hook")
    return (n_layers - 1) // 2 if strategy == "lower" else n_layers // 2


def block_hook_names(hook_names: Iterable[str], layer: int = 0) -> list[str]:
    """Hook names inside one block (e.g. `hook_resid_post`, `attn.hook_z`), from a model's full names."""
    prefix = f"blocks.{layer}."
    return sorted(name[len(prefix):] for name in hook_names if name.startswith(prefix))


def resolve_hook(
    layer: int | None,
    name: str,
    strategy: Literal["lower", "upper"],
    n_layers: int,
    available: Iterable[str],
    section: str = "activations",
) -> HookSpec:
    """Check a hook request against the model and fill in the middle layer when none is given."""
    if layer is None:
        layer = middle_layer(n_layers, strategy)
    elif not 0 <= layer < n_layers:
        raise field_error(f"{section}.hook_layer", layer, f"an integer in [0, {n_layers - 1}] ({n_layers} layers)")
    names = set(available)
    if name not in names:
        common = [n for n in sorted(names) if n.startswith("hook_")]
        raise field_error(f"{section}.hook_name", name, "a hook inside a block, one of " + ", ".join(common))
    return HookSpec(layer=layer, name=name)
