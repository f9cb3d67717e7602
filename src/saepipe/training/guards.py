"""Non-finite values stop training where they appear, and never reach a checkpoint or an export.

The checks read values the loop already has (the step's loss as a Python float; the weights once per
checkpoint), so they cost nothing per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from saepipe.errors import UserError


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_loss(loss: float, step: int, epoch: int, last_checkpoint: Callable[[], Path | None]) -> None:
    """Stop at the first step whose loss is NaN or Inf, saying which checkpoint is the last good one
    (`last_checkpoint` looks it up, only then)."""
    if math.isfinite(loss):
        return
    last = last_checkpoint()
    kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"
    raise UserError(f"the loss became {loss} at step {step} (epoch {epoch}); training stopped before saving "
                    f"anything of this epoch and {kept}; check the activation cache or lower train.lr, then rerun")


def check_finite_weights(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise UserError(f"{where}: {', '.join(bad)} hold{'s' * (len(bad) == 1)} NaN or Inf; refusing to write or "
                        "export non-finite weights")
