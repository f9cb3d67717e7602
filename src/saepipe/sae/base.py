"""The SAE module all architectures share (they plug into `saepipe.sae_types`).

An architecture is a subclass that says which latents are active (`select`, or `dense_features` for
architectures trained densely), how active values become features (`activate`), what sparsity
penalty it pays (`sparsity_loss`) and how it encodes at inference (`inference_features`, which must
not depend on the rest of the batch). Everything else — parameters, the sparse training forward, AuxK,
folding an input scale into the weights — lives here, so the trainer knows nothing of any one
architecture. The decoder's unit-norm constraint is the optimizer's (`training.optimizer`).

Conventions (those of SAELens): W_enc [d_in, d_sae], W_dec [d_sae, d_in], the encoder subtracts b_dec
from its input: pre = (x - b_dec) @ W_enc + b_enc, x_hat = f @ W_dec + b_dec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saepipe.kernels import (
    BatchSums,
    SparseCodes,
    batch_sums,
    decode_sparse,
    encode_selected,
    gather_columns,
)
from saepipe.sae_types import REGISTRY

if TYPE_CHECKING:
    from saepipe.distributed import World
    from saepipe.sae.provenance import Provenance


Knobs = Mapping[str, Any]
"""The user's architecture knobs by their flat params.yaml names (`sae_type`, `sae_expansion`, `topk`,
`topk_aux`, `jumprelu_*`, `matryoshka_prefix_fractions`: the `train` keys users type); each architecture
reads the ones it uses in `from_params`. The SAE code never imports the config that validated them."""


@dataclass(frozen=True)
class SAEConfig:
    """What every SAE module is built from; each architecture subclasses it with the fields it needs.

    Subclasses say how the user's knobs (`Knobs`: `train.*` in params.yaml) become their fields
    (`from_params`, which also checks them against d_sae) and how SAELens names their inference
    architecture, so an architecture is added in its own module and nowhere else.
    """

    arch: ClassVar[str] = ""
    """The registry name, `sae_type` in params and exports; set by `@register`."""
    saelens_architecture: ClassVar[str] = ""
    """SAELens v6's inference architecture that computes what this one does at inference."""

    d_in: int
    d_sae: int
    k_aux: int = 256
    """Dead latents AuxK may use to reconstruct the residual error (0 turns AuxK off)."""

    @property
    def sae_type(self) -> str:
        return self.arch

    @classmethod
    def from_params(cls, knobs: Knobs, d_in: int) -> Self:
        return cls(d_in=d_in, d_sae=knobs["sae_expansion"] * d_in, k_aux=knobs["topk_aux"])

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific keys of SAELens's cfg.json."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"sae_type": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class SAEOutput:
    """A training forward pass: the reconstruction, the active codes, and the loss terms."""

    x_hat: Tensor
    codes: SparseCodes  # active latents; values differentiable in training
    pre: Tensor  # dense pre-activations, detached (AuxK picks dead latents from them)
    recon_loss: Tensor
    sparsity_loss: Tensor  # unweighted; the architecture's own penalty (0 for the top-k family)
    sums: BatchSums | None = None  # the residual and batch sums, detached: AuxK and the metrics reuse them
    x_centered: Tensor | None = None  # x - b_dec, detached


@dataclass
class AuxKTerm:
    """The AuxK loss of a step (no graph) and the function that adds its weighted gradients."""

    loss: Tensor
    add_grads_: Callable[[float], None]


def config_class(sae_type: str) -> type[SAEConfig]:
    if sae_type not in REGISTRY:
        raise ValueError(f"unknown sae_type {sae_type!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[sae_type].config_class


def sae_config(sae_type: str, **fields: Any) -> SAEConfig:
    """`sae_config("topk", d_in=64, d_sae=256, k=8)`: the named architecture's config."""
    return config_class(sae_type)(**fields)


def config_from_params(knobs: Knobs, d_in: int) -> SAEConfig:
    """The `knobs["sae_type"]` architecture's config for `d_in`-dimensional inputs, checked against d_sae."""
    return config_class(knobs["sae_type"]).from_params(knobs, d_in)


def config_from_dict(values: dict[str, Any]) -> SAEConfig:
    """A config as `SAEConfig.to_dict` wrote it (keys of other architectures are ignored)."""
    return config_class(values["sae_type"]).from_dict(values)


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    return REGISTRY[config_class(cfg.arch).arch](cfg)


class _DecodedSquaredError(torch.autograd.Function):
    """x_hat = decoded + b_dec and mean((x - x_hat)^2), with the batch's `BatchSums` from the same pass.

    The gradient needs only the residual and its column sums (for b_dec), both kept from the forward.
    """

    @staticmethod
    def forward(ctx, decoded: Tensor, b_dec: Tensor, x: Tensor):
        ctx.set_materialize_grads(False)
        sums = batch_sums(decoded, b_dec, x)
        ctx.save_for_backward(sums.residual, sums.residual_sum)
        ctx.mark_non_differentiable(sums.residual, sums.rows, sums.residual_sum, sums.x_sum)
        loss = sums.error_sq / sums.residual.numel()
        return sums.x_hat, loss, sums.residual, sums.rows, sums.residual_sum, sums.x_sum

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor | None, grad_loss: Tensor | None, *_):
        residual, residual_sum = ctx.saved_tensors
        grad_decoded = grad_b_dec = None
        if grad_loss is not None:
            scale = grad_loss * (-2.0 / residual.numel())  # d loss / d x_hat = -2 (x - x_hat) / N
            grad_decoded, grad_b_dec = residual * scale, residual_sum * scale
        if grad_x_hat is not None:
            grad_decoded = grad_x_hat if grad_decoded is None else grad_decoded + grad_x_hat
            grad_b_dec = grad_x_hat.sum(0) if grad_b_dec is None else grad_b_dec + grad_x_hat.sum(0)
        grad_x = None
        if ctx.needs_input_grad[2] and grad_loss is not None:
            grad_x = residual * (grad_loss * (2.0 / residual.numel()))
        return grad_decoded, grad_b_dec, grad_x


def decoded_mse(decoded: Tensor, b_dec: Tensor, x: Tensor) -> tuple[Tensor, Tensor, BatchSums]:
    """(x_hat = decoded + b_dec, mean squared error against x, the batch's sums), differentiable in
    `decoded` and `b_dec`."""
    x_hat, loss, residual, rows, residual_sum, x_sum = _DecodedSquaredError.apply(decoded, b_dec, x)
    return x_hat, loss, BatchSums(x_hat.detach(), residual, rows, residual_sum, x_sum)


class SparseAutoencoder(nn.Module):
    arch: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    sparse_training: ClassVar[bool] = True
    """True: select active latents without autograd, then train through the sparse kernels only."""
    shards: World | None = None
    """Set by a data-parallel trainer: the ranks that each hold a block of every training batch, so that
    batch-wide quantities (BatchTopK's cut, AuxK's residual variance) are taken over the global batch."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.provenance: Provenance | None = None  # set by `load_sae`: where an exported SAE came from
        decoder = torch.randn(cfg.d_sae, cfg.d_in)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        # [d_in, d_sae] stored latent-major (the decoder's layout): its sparse gradient is formed latent by latent
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # ---- what an architecture decides -------------------------------------------------------------
    def select(self, pre: Tensor) -> SparseCodes:
        """The active latents of a training batch (values detached), for sparse_training architectures."""
        raise TypeError(f"{self.arch} trains densely: it selects no latents")

    def activate(self, codes: SparseCodes) -> SparseCodes:
        """Selected pre-activations -> feature activations (differentiable). Default: ReLU."""
        return dataclasses.replace(codes, values=F.relu(codes.values))

    def dense_features(self, pre: Tensor) -> Tensor:
        """Features from dense pre-activations with autograd (architectures with sparse_training=False)."""
        raise TypeError(f"{self.arch} trains through sparse codes, not dense features")

    def inference_features(self, pre: Tensor) -> Tensor:
        """Features of each row on its own, independent of the rest of the batch."""
        raise TypeError(f"{type(self).__name__} defines no inference encoding")

    def inference_codes(self, pre: Tensor) -> SparseCodes:
        """`inference_features` as sparse codes (BatchTopK finds them without a dense pass)."""
        features = self.inference_features(pre)
        rows, cols = features.nonzero(as_tuple=True)
        return SparseCodes(rows, cols, features[rows, cols], *features.shape)

    def sparsity_loss(self, codes: SparseCodes, pre: Tensor) -> Tensor:
        return torch.zeros((), device=pre.device)

    def reconstruction(self, x: Tensor, codes: SparseCodes) -> tuple[Tensor, Tensor, BatchSums]:
        """(x_hat, recon_loss, batch sums) for a batch's codes. Matryoshka overrides it to sum prefix losses."""
        return decoded_mse(decode_sparse(codes, self.W_dec), self.b_dec, x)

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """Update running state after an optimizer step (BatchTopK's running threshold, say)."""

    def calibrate_(self, batches: Iterable[Tensor], n_rows: int) -> dict[str, float] | None:
        """Fit what inference needs beyond the trained weights on training rows (`batches`, n_rows in all);
        returns the figures to record, or None when the architecture encodes with its weights alone."""
        return None

    # ---- shared machinery ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_activations(self, x: Tensor) -> Tensor:
        return self._encode_centered(x - self.b_dec)

    def _encode_centered(self, x_centered: Tensor) -> Tensor:
        # mm then an in-place bias add: addmm first copies the broadcast bias into its [batch, d_sae] output
        return torch.mm(x_centered, self.W_enc).add_(self.b_enc)

    def select_biased(self, product: Tensor) -> SparseCodes:
        """`select` on product + b_enc, the bias added into `product` in place (BatchTopK fuses the two)."""
        return self.select(product.add_(self.b_enc))

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [batch, d_sae] for inference (one row never affects another)."""
        return self.inference_features(self.pre_activations(x))

    def decode(self, features: Tensor) -> Tensor:
        return features @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        """Training forward: reconstruction and loss terms, through the sparse kernels when possible."""
        if not self.sparse_training:
            pre = self.pre_activations(x)
            features = self.dense_features(pre)
            x_hat, recon, sums = decoded_mse(features @ self.W_dec, self.b_dec, x)
            rows, cols = features.detach().nonzero(as_tuple=True)
            codes = SparseCodes(rows, cols, features[rows, cols], x.shape[0], self.d_sae)
            pre = pre.detach()
            return SAEOutput(x_hat, codes, pre, recon, self.sparsity_loss(codes, pre), sums)
        with torch.no_grad():
            x_centered = x - self.b_dec
            pre = torch.mm(x_centered, self.W_enc)
            selected = self.select_biased(pre)  # pre now holds the full pre-activations
        values = encode_selected(x_centered, self.b_dec, self.W_enc, self.b_enc, selected)
        codes = self.activate(dataclasses.replace(selected, values=values))
        x_hat, recon, sums = self.reconstruction(x, codes)
        return SAEOutput(x_hat, codes, pre, recon, self.sparsity_loss(codes, pre), sums, x_centered)

    @torch.no_grad()
    def auxk_term(self, x: Tensor, out: SAEOutput, dead: Tensor) -> AuxKTerm | None:
        """AuxK (Gao et al. 2024): dead latents' top-k_aux reconstruct the residual error; None if none is dead.

        Normalised by the residual's variance, and scaled by min(1, dead / k_aux) so that a handful of
        dead latents do not get the full weight. Computed without autograd: autograd would hand back
        full-size gradients of W_enc and W_dec, zeros outside the dead latents, to be added to the main
        ones; here the few dead rows and columns are added in place (`add_grads_`, after the main
        backward), which saves two dense passes per step. The dead latents' pre-activations, the residual
        and x - b_dec all come from the forward pass (`out`); tests check loss and gradients against
        the same loss written for autograd.
        """
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.k_aux == 0:
            return None
        dead_ids = dead.nonzero().squeeze(1)
        features = gather_columns(out.pre, dead_ids)  # the forward's pre-activations: same parameters
        active = features > 0
        if n_dead > self.cfg.k_aux:
            keep = torch.topk(features, self.cfg.k_aux, dim=1, sorted=False).indices
            active &= torch.zeros_like(active).scatter_(1, keep, True)
        active = active.to(features.dtype)  # a 0/1 mask, multiplied in twice
        features.mul_(active)
        sums = out.sums if out.sums is not None else batch_sums(out.x_hat, torch.zeros_like(self.b_dec), x)
        residual = sums.residual
        dead_rows = self.W_dec[dead_ids]
        # ||F W - r||^2 through [batch, n_dead] products only (F: features, W: dead decoder rows, r: the
        # residual): <F, F W W^T> - 2 <F, r W^T> + ||r||^2; [batch, d_in] matrices are only ever read.
        projected = residual @ dead_rows.t()
        fitted = features @ (dead_rows @ dead_rows.t())
        residual_sq = float(sums.error_sq)
        # sum of squares about the per-dimension mean, ||r||^2 - n ||mean||^2: the residual's mean is small
        if self.shards is not None and self.shards.distributed:  # the global batch's variance
            packed = torch.cat([sums.error_sq.reshape(1).double(), sums.residual_sum.double(),
                                torch.tensor([len(residual)], dtype=torch.float64, device=x.device)])
            packed = self.shards.sum_(packed)
            variance = max(float(packed[0]) - float(packed[1:-1].square().sum()) / float(packed[-1]), 1e-12)
        else:
            variance = max(residual_sq - float(sums.residual_sum.square().sum()) / len(residual), 1e-12)
        error_sq = float(torch.linalg.vecdot(features.flatten(), (fitted - 2 * projected).flatten())) + residual_sq
        scale = min(1.0, n_dead / self.cfg.k_aux)
        loss = torch.tensor(max(error_sq, 0.0) * scale / variance, device=x.device)

        def add_grads_(weight: float) -> None:
            for param in (self.W_enc, self.W_dec, self.b_enc, self.b_dec):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            alpha = 2.0 * weight * scale / variance  # d loss / d (F W) = alpha * (F W - r)
            grad_pre = (fitted - projected).mul_(active)  # (F W - r) W^T, where the latent was active
            grad_dead_rows = (features.t() @ features) @ dead_rows - features.t() @ residual  # F^T (F W - r)
            self.W_dec.grad.index_add_(0, dead_ids, grad_dead_rows, alpha=alpha)
            x_centered = out.x_centered if out.x_centered is not None else x - self.b_dec
            self.W_enc.grad.index_add_(1, dead_ids, (grad_pre.t() @ x_centered).t(), alpha=alpha)
            column_sums = grad_pre.sum(0)
            self.b_enc.grad.index_add_(0, dead_ids, column_sums, alpha=alpha)
            self.b_dec.grad.sub_(self.W_enc[:, dead_ids] @ column_sums, alpha=alpha)

        return AuxKTerm(loss, add_grads_)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on `scale * x` take raw x: encodings stay the same, decodes are rescaled."""
        self.W_enc *= scale
        self.b_dec /= scale
        self.W_dec /= scale

    def inference_threshold(self) -> Tensor | None:
        """Per-latent thresholds [d_sae] of architectures that encode with one (exported as `threshold`)."""
        return None

    def set_inference_threshold(self, threshold: Tensor) -> None:
        raise ValueError(f"{self.arch} SAEs have no threshold")

    def export_tensors(self) -> dict[str, Tensor]:
        """Weights in SAELens's names and shapes, plus `threshold` where the architecture has one."""
        tensors = {name: getattr(self, name).detach().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        threshold = self.inference_threshold()
        if threshold is not None:
            tensors["threshold"] = threshold.detach().clone()
        return tensors

    def load_export_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold", None)
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)
            if threshold is not None:
                self.set_inference_threshold(threshold)
