"""Params of the stages after training: export and the analyses of an exported SAE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saepipe.config.fields import check_device
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
        check_device("evaluate.device", self.device)
