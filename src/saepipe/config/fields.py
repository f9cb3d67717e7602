"""The machinery behind every params section: typed fields, nested groups, `--help` text from docstrings.

A section is a frozen dataclass whose fields carry a docstring each (sparsify-style). A field typed as
another dataclass is a *group*: it keeps related settings together in code (`train.sae`,
`train.tracking`), while params.yaml and the CLI keep its fields flat in the section (`train.topk`,
`--topk`), so the file and the predecessor's flag names do not change.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from saepipe.errors import UserError, field_error


def choices(names: Callable[[], list[str]]) -> dict[str, Any]:
    """Field metadata for a string that must be one of `names()`, looked up when the field is checked
    (so the list can live in a registry that is only imported by the stages that need it)."""
    return {"choices": names}


def bounded(low: float, high: float | None = None) -> Any:
    """A numeric field that must lie in [low, high] (high None: no upper bound). The bound is checked with the
    field's type, by `coerce`, and `--help` states it: a size read as given (a figure, a file, a batch) has
    one, so that a typo of a few zeros is refused in a line rather than exhausting memory or disk later."""
    return dataclasses.field(metadata={"bounds": (low, high)})


def bounds_text(bounds: tuple[float, float | None]) -> str:
    low, high = bounds
    return f"at least {low}" if high is None else f"{low} to {high}"


def check_bounds(field: str, value: float, bounds: tuple[float, float | None], kind: str) -> None:
    low, high = bounds
    if value < low:
        raise field_error(field, value, f"{kind} >= {low}")
    if high is not None and value > high:
        raise field_error(field, value, f"{kind} in [{low}, {high}]")


@dataclass(frozen=True)
class FlatField:
    """A key of a section as params.yaml and the CLI see it, and where it lives in the dataclasses."""

    name: str
    hint: Any
    doc: str
    field: dataclasses.Field
    path: tuple[str, ...]  # group attributes leading to it: () for a plain field, ("sae",) for train.sae.topk


def is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@cache
def flat_fields(cls: type) -> tuple[FlatField, ...]:
    """Every key of the section `cls`, groups expanded in place, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[FlatField] = []
    for f in dataclasses.fields(cls):
        if is_group(hints[f.name]):
            out += [dataclasses.replace(sub, path=(f.name, *sub.path)) for sub in flat_fields(hints[f.name])]
        else:
            doc = docs.get(f.name, "")
            if "bounds" in f.metadata:
                doc = f"{doc} Allowed: {bounds_text(f.metadata['bounds'])}.".strip()
            out.append(FlatField(f.name, hints[f.name], doc, f, ()))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: a key appears twice among its groups")
    return tuple(out)


def flat_values(section: Any) -> dict[str, Any]:
    """A section's values keyed as in params.yaml (the inverse of `build_section`)."""
    values = {}
    for f in flat_fields(type(section)):
        obj = section
        for attr in f.path:
            obj = getattr(obj, attr)
        values[f.name] = getattr(obj, f.name)
    return values


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """Type-check the flat `values` against the section `cls`, build its groups, validate every part."""
    keys = [f.name for f in flat_fields(cls)]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise UserError(f"params: unknown key {name}.{unknown[0]}{did_you_mean(unknown[0], keys)} "
                        f"(known: {', '.join(keys)})")
    missing = [k for k in keys if k not in values]
    if missing:
        raise UserError(f"params: {name}.{missing[0]} is missing")
    return _build(cls, values, name)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if is_group(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, section)
        else:
            kwargs[f.name] = coerce(values[f.name], hints[f.name], f"{section}.{f.name}", f.metadata)
    built = cls(**kwargs)
    if hasattr(built, "validate"):
        built.validate()
    return built


def coerce(value: Any, annotation: Any, field: str, metadata: typing.Mapping[str, Any] | None = None) -> Any:
    """Return `value` as `annotation` or raise a UserError naming `field`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], field, metadata)
    if origin is Literal:
        if value not in args:
            raise field_error(field, value, "one of " + ", ".join(map(str, args)))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise field_error(field, value, f"a list of {args[0].__name__}")
        return [coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise field_error(field, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise field_error(field, value, "an integer")
        if metadata and "bounds" in metadata:
            check_bounds(field, value, metadata["bounds"], "an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise field_error(field, value, "a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise field_error(field, value, "a number")
        if metadata and "bounds" in metadata:
            check_bounds(field, float(value), metadata["bounds"], "a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise field_error(field, value, "a string")
        allowed = (metadata or {}).get("choices")
        if allowed is not None and value not in allowed():
            raise field_error(field, value, "one of " + ", ".join(sorted(allowed())))
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {field}")


def check_device(field: str, device: str) -> None:
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise field_error(field, device, "auto, cpu, cuda or cuda:N")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (sparsify-style), used as `--help` text."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def check_positive(section: str, values: dict[str, int]) -> None:
    for name, value in values.items():
        if value < 1:
            raise field_error(f"{section}.{name}", value, "an integer >= 1")


def check_nonnegative(section: str, values: dict[str, float], expected: str = "a number >= 0") -> None:
    for name, value in values.items():
        if value < 0:
            raise field_error(f"{section}.{name}", value, expected)
