"""Typed, validated configuration: one dataclass per `params.yaml` section.

`params.yaml` is the single source of defaults: the dataclasses declare types and documentation
(the docstring under each field is its `--help` text) but no default values, so a value can only
come from a params file or from a CLI flag that overrides it for one run.

A file given with `--params FILE` may hold only some sections and keys: whatever it leaves out comes,
key by key, from `params.yaml` in the current directory (the project's), so `FILE` states just what
differs. A stage validates its own section before any work; a fault in another section stops it only if it
reads that section (`Unusable`), so a bad `interp` value never blocks `process`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from saepipe.config.analysis import (
    ActivationDBConfig,
    EvaluateConfig,
    ExportConfig,
    MatricesConfig,
    SummarizeConfig,
)
from saepipe.config.compare import CompareConfig
from saepipe.config.data import ActivationsConfig, BaseModelConfig, ProcessConfig, TokenizeConfig
from saepipe.config.fields import build_section, coerce, did_you_mean, field_docs, flat_fields, flat_values
from saepipe.config.interp import InterpConfig
from saepipe.config.report import ReportConfig
from saepipe.config.train import EndToEndParams, SAEParams, TrainConfig, WandbParams
from saepipe.errors import UserError

DEFAULT_PARAMS = "params.yaml"

SECTIONS: dict[str, type] = {
    "process": ProcessConfig,
    "base_model": BaseModelConfig,
    "tokenize": TokenizeConfig,
    "activations": ActivationsConfig,
    "train": TrainConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
    "activation_db": ActivationDBConfig,
    "matrices": MatricesConfig,
    "summarize": SummarizeConfig,
    "interp": InterpConfig,
    "report": ReportConfig,
    "compare": CompareConfig,
}


class Unusable:
    """Stands for a section that is missing or did not validate, outside the ones checked up front: reading it
    raises that section's own one-line error, so only a stage that uses the section stops on it."""

    def __init__(self, error: UserError):
        self._error = error

    def __getattr__(self, name: str) -> Any:
        raise UserError(str(self._error))


@dataclass(frozen=True)
class Params:
    """Every section of `params.yaml`, validated (a faulty one not checked up front is `Unusable`)."""

    process: ProcessConfig
    base_model: BaseModelConfig
    tokenize: TokenizeConfig
    activations: ActivationsConfig
    train: TrainConfig
    export: ExportConfig
    evaluate: EvaluateConfig
    activation_db: ActivationDBConfig
    matrices: MatricesConfig
    summarize: SummarizeConfig
    interp: InterpConfig
    report: ReportConfig
    compare: CompareConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The loaded sections as params.yaml holds them (flat keys): what `params_from_dict` reads back."""
        return {name: flat_values(section) for name, section in vars(self).items()
                if not isinstance(section, Unusable)}


Overrides = dict[str, dict[str, Any]]


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A params file's sections as plain mappings, with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path} (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"{path}: unknown section {name!r}{did_you_mean(str(name), list(SECTIONS))} "
                            f"(sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"{path}: section {name!r} is not a mapping of keys to values")
    return raw


def layered_params(path: str | Path) -> dict[str, Any]:
    """`path`'s values over the project's `params.yaml` (in the current directory), key by key."""
    raw = read_params_file(path)
    defaults = Path(DEFAULT_PARAMS)
    if defaults.is_file() and defaults.resolve() != Path(path).resolve():
        base = read_params_file(defaults)
        raw = {name: {**base.get(name, {}), **raw.get(name, {})} for name in {*base, *raw}}
    return raw


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Overrides | None = None,
                strict: list[str] | tuple[str, ...] | None = None) -> Params:
    """Load and validate a params file; `overrides` maps section -> key -> already-typed value (the CLI's
    flags). The `strict` sections (default: all) must validate now; the others become `Unusable` if not."""
    return params_from_dict(layered_params(path), overrides, strict)


def params_from_dict(raw: dict[str, Any], overrides: Overrides | None = None,
                     strict: list[str] | tuple[str, ...] | None = None) -> Params:
    overrides = overrides or {}
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            values = raw.get(name)
            if not isinstance(values, dict):
                raise UserError(f"params: section {name!r} is missing or not a mapping")
            built[name] = build_section(name, cls, {**values, **overrides.get(name, {})})
        except UserError as exc:
            if strict is None or name in strict:
                raise
            built[name] = Unusable(exc)
    return Params(**built)


def replace_values(section: Any, **changes: Any) -> Any:
    """A copy of a built section with some keys (as named in params.yaml) changed, validated again."""
    name = next(n for n, cls in SECTIONS.items() if isinstance(section, cls))
    return build_section(name, SECTIONS[name], {**flat_values(section), **changes})


__all__ = [
    "DEFAULT_PARAMS",
    "SECTIONS",
    "ActivationDBConfig",
    "ActivationsConfig",
    "BaseModelConfig",
    "CompareConfig",
    "EndToEndParams",
    "EvaluateConfig",
    "ExportConfig",
    "InterpConfig",
    "MatricesConfig",
    "Overrides",
    "Params",
    "ProcessConfig",
    "ReportConfig",
    "SAEParams",
    "SummarizeConfig",
    "TokenizeConfig",
    "TrainConfig",
    "WandbParams",
    "build_section",
    "coerce",
    "field_docs",
    "flat_fields",
    "flat_values",
    "load_params",
    "params_from_dict",
    "replace_values",
]
