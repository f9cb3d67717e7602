"""Params of the train stage, in groups: the SAE itself, the end-to-end losses, tracking, and the rest
(optimisation, data, checkpoints). params.yaml keeps them flat under `train:` (see `config.fields`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from saepipe.config.fields import check_device, check_nonnegative, check_positive, choices
from saepipe.errors import field_error
from saepipe.sae_types import SAE_TYPES

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def sae_types() -> list[str]:
    return list(SAE_TYPES)


@dataclass(frozen=True)
class SAEParams:
    """The SAE's architecture and size. Each architecture's config (`sae/<type>.py`) reads the knobs it
    uses from here and checks them against d_sae."""

    sae_type: str = field(metadata=choices(sae_types))
    """SAE architecture: batch_topk, topk, standard, jumprelu or matryoshka (the registered types)."""
    sae_expansion: int
    """Dictionary size as a multiple of the activation width: d_sae = sae_expansion x d_in."""
    topk: int
    """Active latents per token (topk), or per token on average over a batch (batch_topk, matryoshka)."""
    topk_aux: int
    """Dead latents AuxK may use to reconstruct the residual error (0 turns AuxK off)."""
    jumprelu_bandwidth: float
    """Width of JumpReLU's straight-through window around its threshold."""
    jumprelu_init_threshold: float
    """JumpReLU's initial threshold (in normalised activation units)."""
    matryoshka_prefix_fractions: list[float]
    """Matryoshka's nested dictionary sizes as fractions of d_sae, increasing, each in (0, 1)."""

    def validate(self) -> None:
        check_positive("train", {"sae_expansion": self.sae_expansion, "topk": self.topk})
        check_nonnegative("train", {"topk_aux": self.topk_aux}, "an integer >= 0")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if getattr(self, name) <= 0:
                raise field_error(f"train.{name}", getattr(self, name), "a number > 0")
        fractions = self.matryoshka_prefix_fractions
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise field_error("train.matryoshka_prefix_fractions", fractions,
                              "increasing distinct fractions, each in (0, 1)")


@dataclass(frozen=True)
class EndToEndParams:
    """Losses computed with the reconstruction spliced into the model (off by default)."""

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

    def validate(self) -> None:
        check_positive("train", {"end_to_end_windows": self.end_to_end_windows})
        check_nonnegative("train", {"logit_kl_weight": self.logit_kl_weight,
                                    "block_mse_weight": self.block_mse_weight})
        if self.use_end_to_end and not (self.use_logit_kl or self.use_block_mse):
            raise field_error("train.use_end_to_end", True,
                              "false, or at least one of train.use_logit_kl / train.use_block_mse on")


@dataclass(frozen=True)
class WandbParams:
    """Weights & Biases tracking (dvclive always tracks; W&B is optional)."""

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

    @property
    def enabled(self) -> bool:
        return self.wandb and self.wandb_mode != "disabled"


@dataclass(frozen=True)
class TrainConfig:
    """Activation cache -> a trained SAE, with checkpoints, per-epoch metrics and optional tracking."""

    run_name: str | None
    """Names the run's folders (<output_dir>/<run_name>/, models/sae/<run_name>/, analysis/<run_name>/); null:
    derived from the activation cache and the SAE (model.L<layer>.<hook>.<sae_type>.x<expansion>.k<topk>), for
    ad-hoc runs only: dvc.yaml's paths need an explicit name."""
    sae: SAEParams
    aux_coefficient: float
    """Weight of the AuxK loss."""
    sparsity_penalty: float
    """Weight of the sparsity loss: L1 weighted by decoder row norm (standard), or L0 (jumprelu)."""
    sparsity_warmup_steps: int
    """Steps over which the sparsity penalty ramps up linearly from 0 (standard, jumprelu)."""
    num_epochs: int | None
    """Passes over the cached training split; null: as many as it takes to see train.training_tokens."""
    training_tokens: int | None
    """Training budget in tokens (activation rows) when num_epochs is null: ceil(training_tokens / training
    rows) epochs, so a small cache is seen many times and a large one about once, in similar time."""
    calibration_rows: int
    """Training rows (a seeded sample; all when fewer) on which BatchTopK's and Matryoshka's inference threshold
    is calibrated at each validation, so that they keep train.topk latents per token on average."""
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
    keep_checkpoints: int | None
    """Epoch checkpoints kept on disk, the newest (best_model.pt is kept besides); null: every one."""
    log_freq: int
    """Update the progress bar's loss figures every this many steps."""
    val_every_steps: int | None
    """Also validate every this many steps, for the dvclive curves only (on a fixed subsample; the best epoch is
    still chosen by each epoch's full validation); null: about 16 points per run; 0: only at epoch ends."""
    resume: bool
    """Continue from the newest checkpoint of this run instead of starting over."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    end_to_end: EndToEndParams
    tracking: WandbParams
    output_dir: str
    """Each run's folder is <output_dir>/<run_name>/: checkpoints/ (resume, export), live/ (dvclive metrics and
    plots) and wandb/ (W&B's local files, when on)."""
    hook: str | None
    """The cached hook to train on (e.g. blocks.3.hook_resid_post) when the activation cache holds several
    (activations.hooks); null: the cache's only hook."""

    def epochs(self, train_rows: int) -> int:
        """Epochs this run trains over `train_rows` cached rows: num_epochs, or enough to see training_tokens."""
        if self.num_epochs is not None:
            return self.num_epochs
        assert self.training_tokens is not None  # validate()
        return max(1, math.ceil(self.training_tokens / max(train_rows, 1)))

    def validate(self) -> None:
        if self.run_name is not None and (not RUN_NAME.fullmatch(self.run_name) or ".." in self.run_name):
            raise field_error("train.run_name", self.run_name,
                              "a folder name of letters, digits, '.', '_' and '-' (not starting with '.', no '..')")
        check_positive("train", {"batch_size": self.batch_size, "calibration_rows": self.calibration_rows,
                                 "checkpoint_freq": self.checkpoint_freq, "log_freq": self.log_freq})
        for name in ("num_epochs", "training_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise field_error(f"train.{name}", value, "an integer >= 1 or null")
        if self.num_epochs is None and self.training_tokens is None:
            raise field_error("train.num_epochs", None, "an integer >= 1 when train.training_tokens is null "
                              "(one of the two sets the training budget)")
        if self.lr <= 0:
            raise field_error("train.lr", self.lr, "a number > 0")
        check_nonnegative("train", {"lr_warmup_steps": self.lr_warmup_steps,
                                    "sparsity_warmup_steps": self.sparsity_warmup_steps}, "an integer >= 0")
        check_nonnegative("train", {"aux_coefficient": self.aux_coefficient,
                                    "sparsity_penalty": self.sparsity_penalty})
        if not 0 <= self.lr_decay_fraction <= 1:
            raise field_error("train.lr_decay_fraction", self.lr_decay_fraction, "a number in [0, 1]")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise field_error("train.adam_betas", self.adam_betas, "two numbers in [0, 1)")
        if self.val_every_steps is not None and self.val_every_steps < 0:
            raise field_error("train.val_every_steps", self.val_every_steps, "an integer >= 0 or null")
        for name in ("dead_window_tokens", "max_train_rows", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise field_error(f"train.{name}", value, "an integer >= 1 or null")
        check_device("train.device", self.device)
