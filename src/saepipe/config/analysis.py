"""Params of the stages after training: export and the analyses of an exported SAE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saepipe.config.fields import bounded, check_device
from saepipe.errors import field_error


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
    batch_size: int = bounded(1, 16384)
    """Activation rows per SAE batch (the ablation pass batches windows as the activations stage did); each
    holds d_sae floats a row several times over."""
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
        check_device("evaluate.device", self.device)


@dataclass(frozen=True)
class ActivationDBConfig:
    """The evaluated SAE's features on every cached token -> <analysis>/activation_db.h5 (CSR + sorted CSC)."""

    splits: list[Literal["train", "validation"]]
    """Splits of the activation cache to encode (rows keep their split)."""
    values_dtype: Literal["float16", "float32"]
    """dtype of the stored feature activations."""
    quantiles: list[float]
    """Activation quantiles per feature, over the tokens it fires on."""
    batch_size: int = bounded(1, 65536)
    """Activation rows per SAE encode; a batch must also fit max_memory_mb (8 x (d_in + d_sae) bytes a row
    are counted), which the stage checks against the SAE before it starts."""
    max_memory_mb: int = bounded(16, 1 << 20)
    """Bound on the build's working memory: the encode batches and the reverse index's feature blocks fit it."""
    include_outliers: bool
    """Encode the cache's massive-activation outlier rows too (by default they stay as rows without features)."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""

    def validate(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise field_error("activation_db.splits", self.splits, "a non-empty list of distinct splits")
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles) or self.quantiles != sorted(set(self.quantiles)):
            raise field_error("activation_db.quantiles", self.quantiles, "increasing distinct numbers in [0, 1]")
        check_device("activation_db.device", self.device)


@dataclass(frozen=True)
class MatricesConfig:
    """Decoder similarity and co-occurrence between features -> <analysis>/matrices/."""

    top_k: int = bounded(1, 1000)
    """Nearest features (decoder cosine) and top co-occurring features kept per feature (d_sae - 1 at most
    exist)."""
    dense_max_features: int = bounded(1, 32768)
    """Write the dense d_sae x d_sae matrices only up to this many features (16 bytes a pair on disk: 17 GB
    at the bound); above it, only the top-k files."""
    block_size: int = bounded(1, 16384)
    """Features per block of the decoder-similarity product (block x d_sae floats in memory)."""
    chunk_rows: int = bounded(1, 262144)
    """Activation-DB rows per co-occurrence chunk (each row's L0 squared feature pairs in memory)."""
    similarity_threshold: float
    """Decoder cosine above which a pair counts as near-duplicate in the metrics."""
    histogram_bins: int = bounded(1, 10000)
    """Bins of the decoder-similarity histogram (each feature's max cosine to any other)."""

    def validate(self) -> None:
        if not -1.0 < self.similarity_threshold < 1.0:
            raise field_error("matrices.similarity_threshold", self.similarity_threshold, "a number in (-1, 1)")


@dataclass(frozen=True)
class SummarizeConfig:
    """One JSON line per feature: stats, examples, logit lens, neighbours -> <analysis>/feature_summaries.jsonl."""

    top_k: int = bounded(1, 100)
    """Top-activating examples per feature (each a line of context in feature_summaries.jsonl: 20 make tens
    of MB for a few thousand features)."""
    context_before: int = bounded(0, 256)
    """Tokens of context before the activating token in each example."""
    context_after: int = bounded(0, 256)
    """Tokens of context after it."""
    quantile_bands: list[float]
    """Activation quantiles (over the tokens a feature fires on) around which lower-band examples are drawn
    (at most 16 bands)."""
    quantile_examples: int = bounded(1, 100)
    """Examples per quantile band."""
    logit_tokens: int = bounded(1, 100)
    """Tokens listed as promoted and as suppressed by each feature's decoder direction (logit lens)."""
    top_tokens: int = bounded(1, 100)
    """Most frequent activating tokens listed per feature."""
    neighbours: int = bounded(0, 1000)
    """Nearest features (decoder cosine) and co-occurring features listed per feature (at most the top_k the
    matrices were made with, checked when the stage starts)."""
    index_tokens: int = bounded(1, 100)
    """Top token strings per feature in summary_index.json (the first of the top_tokens listed: no more than
    top_tokens even when set higher)."""

    def validate(self) -> None:
        if len(self.quantile_bands) > 16:
            raise field_error("summarize.quantile_bands", self.quantile_bands, "at most 16 bands")
        if any(not 0.0 < q < 1.0 for q in self.quantile_bands):
            raise field_error("summarize.quantile_bands", self.quantile_bands, "numbers strictly between 0 and 1")
