"""ConstrainedAdam's compiled CPU pass (numba): one sweep over each row does the whole update.

Per row: drop the gradient's component along the row (the decoder's unit-norm constraint), apply torch's
Adam update element by element, rescale the row to unit norm, with the row in cache throughout. numpy
arrays in place, on as many threads as torch uses; `training.optimizer` decides when it applies. The
first call compiles (cached in __pycache__).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)
def _adam(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, step_size,
          inv_bias_correction2_sqrt, eps, tiny, unit_rows):  # pragma: no cover - compiled
    n_rows, d = param.shape
    for i in prange(n_rows):
        if unit_rows:  # drop the gradient along the row: it would only change the row's norm
            along = norm_sq = param.dtype.type(0)
            for j in range(d):
                along += grad[i, j] * param[i, j]
                norm_sq += param[i, j] * param[i, j]
            factor = along / max(norm_sq, tiny)
            for j in range(d):
                grad[i, j] -= factor * param[i, j]
        for j in range(d):  # torch's Adam update, element by element
            g = grad[i, j]
            m = exp_avg[i, j] + one_minus_beta1 * (g - exp_avg[i, j])
            v = beta2 * exp_avg_sq[i, j] + one_minus_beta2 * g * g
            exp_avg[i, j] = m
            exp_avg_sq[i, j] = v
            param[i, j] -= step_size * m / (np.sqrt(v) * inv_bias_correction2_sqrt + eps)
        if unit_rows:
            norm_sq = param.dtype.type(0)
            for j in range(d):
                norm_sq += param[i, j] * param[i, j]
            scale = 1 / max(np.sqrt(norm_sq), tiny)
            for j in range(d):
                param[i, j] *= scale


def adam(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, *, lr: float,
         beta1: float, beta2: float, eps: float, step: int, unit_rows: bool) -> None:
    """One Adam step in place (torch's update: bias-corrected moments, eps added after the square root).

    With `unit_rows` (a 2-D param), each row's gradient first loses its component along the row and the
    row is rescaled to unit norm after its update: the SAE decoder's constraint, in the same pass.
    """
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if param.ndim != 2:  # biases: one row
        param, grad, exp_avg, exp_avg_sq = (a.reshape(1, -1) for a in (param, grad, exp_avg, exp_avg_sq))
    # In the parameters' own precision: float64 scalars would turn every float32 operation into two casts.
    constants = np.array([1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step), 1 / np.sqrt(1 - beta2**step), eps,
                          1e-12], dtype=param.dtype)
    _adam(param, grad, exp_avg, exp_avg_sq, *constants, unit_rows)
