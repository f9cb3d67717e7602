"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its k x batch largest latents.

Tokens may use more or fewer than k latents as long as the batch averages k. At inference a batch
rule would make one token's code depend on its neighbours, so inference keeps every activation above
one shared threshold (a JumpReLU with one threshold), token by token.

That threshold is calibrated, not estimated: `calibrate_` sets it to the value above which the
training rows keep exactly k latents per token on average. A running average of each batch's smallest
kept value (what the paper and SAELens export) lags the falling cut over a short run: it carried the
early, larger cuts and kept about half of k at inference on our default run. The running value is
still kept during training, as the hint that makes the exact batch selection cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saepipe.kernels import SparseCodes, batch_top_k, codes_above, exact_cut, sharded_batch_top_k
from saepipe.sae.base import SAEOutput
from saepipe.sae.topk import TopKConfig, TopKSAE
from saepipe.sae_types import register


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    saelens_architecture = "jumprelu"  # as SAELens exports it: one threshold repeated for every latent

    threshold_momentum: float = 0.05
    """Update rate of the running threshold between calibrations (a hint for the batch selection)."""

    def saelens_fields(self) -> dict[str, Any]:
        return {}


@register("batch_topk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))
        self._last_cut = math.inf  # the last training batch's smallest kept value (a hint, not state)

    def select(self, pre: Tensor) -> SparseCodes:
        return self._select(pre, bias=None)

    def select_biased(self, product: Tensor) -> SparseCodes:
        return self._select(product, bias=self.b_enc)

    def _select(self, pre: Tensor, bias: Tensor | None) -> SparseCodes:
        # Just under the running threshold and the last batch's cut: a cheap lower bound for the exact
        # selection that holds unless the cut falls >10% in a step (batch_top_k then lowers it itself).
        hint = None
        if int(self.threshold_steps) > 0:
            hint = 0.9 * min(float(self.threshold), self._last_cut)
        if self.shards is not None and self.shards.distributed:
            codes, self._last_cut = sharded_batch_top_k(pre, self.cfg.k, self.shards, hint=hint, bias=bias)
            return codes
        codes = batch_top_k(pre, self.cfg.k * pre.shape[0], hint=hint, bias=bias)
        if codes.nnz:
            self._last_cut = float(codes.values.min())
        return codes

    def inference_features(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold)

    def inference_codes(self, pre: Tensor) -> SparseCodes:
        return codes_above(pre, float(self.threshold))

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        positive = out.codes.values[out.codes.values > 0]
        if self.shards is not None and self.shards.distributed:  # the global batch's smallest kept value
            smallest = self.shards.min_float(float(positive.min()) if positive.numel() else math.inf,
                                             positive.device)
            if math.isinf(smallest):
                return
            lowest = torch.tensor(smallest, dtype=self.threshold.dtype, device=self.threshold.device)
        elif positive.numel() == 0:
            return
        else:
            lowest = positive.min()
        self.threshold_steps += 1
        # A running mean at first, then an exponential average that forgets the early, larger values.
        rate = max(1.0 / int(self.threshold_steps), self.cfg.threshold_momentum)
        self.threshold.lerp_(lowest, rate)

    @torch.no_grad()
    def calibrate_(self, batches: Iterable[Tensor], n_rows: int) -> dict[str, float]:
        """Set the inference threshold so that `batches` (training rows, n_rows in all) keep k latents per
        row on average: the (k n_rows)-th largest pre-activation, found exactly (`kernels.exact_cut`)."""
        threshold, l0 = exact_cut((self.pre_activations(x) for x in batches), self.cfg.k, n_rows)
        self.threshold.fill_(threshold)
        self.threshold_steps.clamp_(min=1)
        return {"inference_threshold": threshold, "calibration_l0": l0, "calibration_rows": float(n_rows)}

    def inference_threshold(self) -> Tensor:
        return self.threshold.expand(self.d_sae)

    def set_inference_threshold(self, threshold: Tensor) -> None:
        self.threshold.copy_(threshold.reshape(-1)[0])
        self.threshold_steps.fill_(1)
