"""Adam with the SAE decoder's unit-norm constraint folded in: one pass over each parameter per step.

The update and the state are torch.optim.Adam's (step, exp_avg, exp_avg_sq; no weight decay, no
amsgrad), so checkpoints hold the same state dict. A parameter group with `unit_rows=True` (the
decoder) also has each row's gradient component along the row removed before the update and each row
rescaled to unit norm after it. On the CPU the three run in one compiled pass per row, with each row in
cache (`training.adam_kernel`; torch's fused Adam plus the two separate passes cost about twice as much);
elsewhere they run as the same three steps in tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from saepipe.training import adam_kernel


class ConstrainedAdam(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "unit_rows": False})

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature; no closure is used
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                tensors = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
                options = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                           "step": int(state["step"]), "unit_rows": group["unit_rows"]}
                arrays = _compiled_views(tensors, keep_rows=group["unit_rows"])
                if arrays is not None:
                    adam_kernel.adam(*arrays, **options)
                else:
                    _adam_in_torch(*tensors, **options)


def _compiled_views(tensors: tuple[Tensor, ...], keep_rows: bool) -> list | None:
    """C-contiguous numpy views of CPU float tensors that share one layout (a column-major matrix is
    viewed transposed: Adam is elementwise, only the unit-row constraint needs the rows), else None."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.dtype != first.dtype or t.device != first.device or t.stride() != first.stride() for t in tensors):
        return None
    if first.is_contiguous():
        return [t.numpy() for t in tensors]
    if first.dim() == 2 and first.t().is_contiguous() and not keep_rows:
        return [t.t().numpy() for t in tensors]
    return None


def _adam_in_torch(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                   beta2: float, eps: float, step: int, unit_rows: bool) -> None:
    if unit_rows:
        remove_parallel_(grad, param)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    if unit_rows:
        normalize_rows_(param)


def remove_parallel_(grad: Tensor, rows: Tensor) -> None:
    """grad[i] -= (grad[i] . rows[i] / |rows[i]|^2) rows[i], in place: the part of each row's gradient
    that would only change the row's norm."""
    along = torch.linalg.vecdot(grad, rows) / torch.linalg.vector_norm(rows, dim=1).square().clamp_min(1e-12)
    grad.addcmul_(along.unsqueeze(1), rows, value=-1)


def normalize_rows_(matrix: Tensor) -> None:
    """Each row rescaled to unit norm, in place (zero rows stay zero)."""
    matrix /= torch.linalg.vector_norm(matrix, dim=1, keepdim=True).clamp_min(1e-12)
