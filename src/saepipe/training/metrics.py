"""Per-epoch metrics, named as the predecessor named them (validation twins get a `val_` prefix).

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with mean(x) the per-dimension mean of the rows
evaluated, both sums accumulated in float64 over the whole epoch (not averaged per batch), so it is
the fraction of variance the SAE leaves unexplained; explained_variance = 1 - FVU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saepipe.distributed import World
from saepipe.kernels import BatchSums, batch_sums


@dataclass
class EpochMetrics:
    d_sae: int
    rows: int = 0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # per-row-weighted sums of batch means
    active: int = 0  # total active latents over all rows
    cos_sum: float = 0.0
    error_sq: float = 0.0
    x_sq: float = 0.0
    x_sum: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, nnz: int, terms: dict[str, float], sums: BatchSums | None = None
            ) -> None:
        """One batch; `sums` are the forward pass's `BatchSums` when the caller has them (it saves a pass)."""
        n = x.shape[0]
        self.rows += n
        self.steps += 1
        self.active += nnz
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * n
        if sums is None:
            sums = batch_sums(x_hat, torch.zeros(x.shape[1], dtype=x_hat.dtype, device=x_hat.device), x)
        # Per-row and per-column sums in float32 within a batch, accumulated across the epoch in float64.
        x_sq, x_dot_x_hat, x_hat_sq, error_sq = sums.rows.double().unbind(1)
        self.error_sq += float(error_sq.sum())
        self.x_sq += float(x_sq.sum())
        self.x_sum = sums.x_sum.double() if self.x_sum is None else self.x_sum + sums.x_sum.double()
        self.cos_sum += float((x_dot_x_hat / (x_sq * x_hat_sq).sqrt().clamp_min(1e-8)).sum())

    def reduce_(self, world: World, device: torch.device) -> None:
        """Sum the epoch's figures over the ranks of a data-parallel run (every rank gets the totals)."""
        if not world.distributed:
            return
        names = sorted(self.sums)
        scalars = torch.tensor([self.rows, self.steps, self.active, self.cos_sum, self.error_sq, self.x_sq,
                                *(self.sums[name] for name in names)], dtype=torch.float64, device=device)
        x_sum = self.x_sum.to(device) if self.x_sum is not None else torch.zeros(0, dtype=torch.float64,
                                                                                  device=device)
        packed = world.sum_(torch.cat([scalars, x_sum]))
        values = packed[: len(scalars)].tolist()
        self.rows, self.steps, self.active = int(values[0]), int(values[1]) // world.size, int(values[2])
        self.cos_sum, self.error_sq, self.x_sq = values[3:6]
        self.sums = dict(zip(names, values[6:], strict=True))
        self.x_sum = packed[len(scalars) :].cpu() if self.x_sum is not None else None

    def summary(self, prefix: str = "") -> dict[str, float]:
        if self.rows == 0:
            return {}
        assert self.x_sum is not None
        total_variance = self.x_sq - float(self.x_sum.pow(2).sum()) / self.rows
        fvu = self.error_sq / total_variance if total_variance > 0 else float("nan")
        out = {name: value / self.rows for name, value in self.sums.items()}
        l0 = self.active / self.rows
        out.update({
            "l0": l0,
            "sparsity": l0 / self.d_sae,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cos_sim": self.cos_sum / self.rows,
        })
        loss = out.get("loss", 0.0)
        if loss > 0:
            out["recon_contribution"] = out.get("recon_loss", 0.0) / loss
            out["l1_contribution"] = out.get("weighted_l1_loss", 0.0) / loss
        out.pop("weighted_l1_loss", None)
        return {f"{prefix}{name}": value for name, value in out.items()}


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last `decay_fraction` of training."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = round(decay_fraction * total_steps)
    if decay_steps > 0 and step >= total_steps - decay_steps:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


def warmup_factor(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
