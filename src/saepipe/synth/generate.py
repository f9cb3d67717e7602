"""Synthetic activations with a known answer: a seeded ground-truth dictionary, sparse rows drawn from it.

Each row is `x = sum_i m_i f_i d_i + bias + noise`: `d_i` the true feature directions (unit rows of
`dictionary`), `f_i` in {0, 1} whether feature i fires, `m_i > 0` its magnitude. What is known is kept
(`Truth`), so a trained SAE's decoder and codes can be scored against it (`saepipe.synth.score`).

- firing: feature i fires with marginal probability p_i proportional to (i + 1)^-zipf_exponent (feature 0
  the most frequent), scaled so that sum_i p_i = active_per_row (each p_i capped at 1).
- hierarchy: a fraction of the features are children; a child fires only on rows where its parent (a
  root feature more frequent than it) fires, with probability p_child / p_parent there, so its marginal
  stays p_child. One level deep: parents are never children.
- correlation: each feature's own draw is a Gaussian copula `z_i < Phi^-1(q_i)` with
  z = sqrt(c) L g + sqrt(1 - c) eps, g ~ N(0, I_rank) shared by the row and L's rows unit vectors: features
  with aligned loadings fire together, every marginal unchanged (c = 0: independent draws).
- magnitudes: lognormal with mean 1, exp(sigma eps - sigma^2 / 2); sigma 0 makes every magnitude 1.
- noise: i.i.d. Gaussian per coordinate; bias: one fixed random vector of the given norm (so b_dec matters).

Every draw comes from a generator seeded by (seed, stream, chunk): the truth, the train rows, the
validation rows and the scorer's fresh rows are separate streams, each reproducible on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saepipe.errors import UserError, field_error

CORRELATION_RANK = 8
"""Shared factors of the copula: few, so that correlated groups are broad (each feature loads on all)."""
STREAMS = {"truth": 0, "train": 1, "validation": 2, "score": 3}
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic setting: everything that decides the truth and the rows drawn from it."""

    d_in: int = 256
    """width of each activation row"""
    n_features: int = 4096
    """number of true features (dictionary rows)"""
    active_per_row: float = 30.0
    """expected number of true features firing in a row (the sum of the firing probabilities)"""
    zipf_exponent: float = 0.5
    """firing probability of feature i is proportional to (i + 1)^-exponent (0: all equally frequent)"""
    magnitude_sigma: float = 0.25
    """log-space std of the lognormal magnitudes, whose mean is 1 (0: every magnitude is 1)"""
    hierarchy: float = 0.2
    """fraction of features that are children: a child fires only where its (more frequent) parent fires"""
    correlation: float = 0.1
    """in [0, 1): weight of the shared low-rank Gaussian factors in each feature's firing draw (0: independent)"""
    noise_std: float = 0.02
    """std of the Gaussian noise added to every coordinate"""
    bias_norm: float = 1.0
    """norm of a fixed random offset added to every row (0: none)"""
    orthogonal: bool = False
    """orthonormal true directions (needs n_features <= d_in); otherwise random unit vectors"""
    rows: int = 200_000
    """rows in all, train and validation together"""
    val_fraction: float = 0.05
    """share of the rows in the validation split"""
    doc_rows: int = 128
    """rows per synthetic 'document' (doc_ids / positions in the cache are counters over blocks of rows)"""
    seed: int = 0
    """seeds the truth and every row"""
    name: str = "default"
    """the setting's name: the cache's model_name is synthetic/<name>"""

    def validate(self) -> None:
        """Refuse a setting that cannot be drawn, naming the field (`synth.<field>`)."""
        for name in ("d_in", "n_features", "rows", "doc_rows"):
            if getattr(self, name) < 1:
                raise field_error(f"synth.{name}", getattr(self, name), "an integer >= 1")
        if not 0 < self.active_per_row <= self.n_features:
            raise field_error("synth.active_per_row", self.active_per_row,
                              f"a number in (0, n_features={self.n_features}]")
        for name in ("zipf_exponent", "magnitude_sigma", "noise_std", "bias_norm"):
            if not getattr(self, name) >= 0:
                raise field_error(f"synth.{name}", getattr(self, name), "a number >= 0")
        if not 0 <= self.hierarchy < 1:
            raise field_error("synth.hierarchy", self.hierarchy, "a fraction in [0, 1)")
        if not 0 <= self.correlation < 1:
            raise field_error("synth.correlation", self.correlation, "a number in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise field_error("synth.val_fraction", self.val_fraction, "a fraction in (0, 1)")
        if self.orthogonal and self.n_features > self.d_in:
            raise field_error("synth.orthogonal", True, f"false, or n_features <= d_in ({self.n_features} > "
                              f"{self.d_in}): at most d_in directions are orthogonal")
        if min(self.split_rows().values()) < 1:
            raise field_error("synth.rows", self.rows, "enough rows for both splits to hold one")

    def split_rows(self) -> dict[str, int]:
        validation = round(self.rows * self.val_fraction)
        return {"train": self.rows - validation, "validation": validation}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def generator(seed: int, stream: str, chunk: int = 0) -> torch.Generator:
    """A torch generator for one (seed, stream, chunk): streams never share draws, chunks never repeat."""
    state = np.random.SeedSequence([seed, STREAMS[stream], chunk]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def zipf_probabilities(n: int, total: float, exponent: float) -> Tensor:
    """p_i = min(1, c (i + 1)^-exponent) with c chosen (bisection) so that sum_i p_i = total."""
    base = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    low, high = 0.0, float(total / base.min())
    for _ in range(200):
        mid = (low + high) / 2
        if float(torch.clamp(mid * base, max=1.0).sum()) < total:
            low = mid
        else:
            high = mid
    return torch.clamp(high * base, max=1.0).float()


@dataclass
class Truth:
    """The ground truth of a setting: what generated every row."""

    config: SynthConfig
    dictionary: Tensor
    """[n_features, d_in] unit rows: the true feature directions"""
    probabilities: Tensor
    """[n_features] marginal firing probabilities (Zipf, decreasing with the index)"""
    parents: Tensor
    """[n_features] int64: the parent feature of a child, -1 for a root"""
    own_probabilities: Tensor
    """[n_features] each feature's own draw: p for a root, p / p_parent (given the parent fired) for a child"""
    loadings: Tensor
    """[n_features, CORRELATION_RANK] unit rows of the copula's loadings (unused when correlation is 0)"""
    bias: Tensor
    """[d_in] the offset added to every row"""

    TENSORS = ("dictionary", "probabilities", "parents", "own_probabilities", "loadings", "bias")

    @classmethod
    def build(cls, cfg: SynthConfig) -> Truth:
        cfg.validate()
        gen = generator(cfg.seed, "truth")
        n, d = cfg.n_features, cfg.d_in
        raw = torch.randn(d if cfg.orthogonal else n, d, generator=gen)
        if cfg.orthogonal:
            q, r = torch.linalg.qr(raw)
            dictionary = (q * torch.sign(torch.diagonal(r))).t()[:n].contiguous()
        else:
            dictionary = raw / raw.norm(dim=1, keepdim=True)
        p = zipf_probabilities(n, cfg.active_per_row, cfg.zipf_exponent)
        parents = torch.full((n,), -1, dtype=torch.int64)
        n_children = min(round(cfg.hierarchy * n), n - 1)
        if n_children:
            children = torch.randperm(n - 1, generator=gen)[:n_children] + 1  # feature 0 is always a root
            is_child = torch.zeros(n, dtype=torch.bool)
            is_child[children] = True
            roots = torch.nonzero(~is_child).squeeze(1)  # sorted; a child's parent is a root of lower index
            below = torch.searchsorted(roots, children)
            pick = (torch.rand(n_children, generator=gen) * below).long()
            parents[children] = roots[pick]
        own = p.clone()
        child = parents >= 0
        own[child] = (p[child] / p[parents[child]]).clamp(max=1.0)
        loadings = torch.randn(n, CORRELATION_RANK, generator=gen)
        loadings /= loadings.norm(dim=1, keepdim=True)
        bias = torch.randn(d, generator=gen)
        bias *= cfg.bias_norm / bias.norm()
        return cls(cfg, dictionary.float(), p, parents, own, loadings, bias)

    def sample(self, rows: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [rows, d_in], codes [rows, n_features]): the rows and each true feature's magnitude in them
        (0 where it does not fire), so x = codes @ dictionary + bias + noise."""
        cfg = self.config
        n = cfg.n_features
        if cfg.correlation > 0:
            shared = torch.randn(rows, CORRELATION_RANK, generator=gen) @ self.loadings.t()
            z = torch.randn(rows, n, generator=gen).mul_((1 - cfg.correlation) ** 0.5)
            z.add_(shared, alpha=cfg.correlation ** 0.5)
            fires = z < torch.special.ndtri(self.own_probabilities.double()).float()
        else:
            fires = torch.rand(rows, n, generator=gen) < self.own_probabilities
        child = torch.nonzero(self.parents >= 0).squeeze(1)
        if len(child):
            fires[:, child] &= fires[:, self.parents[child]]
        r, c = fires.nonzero(as_tuple=True)
        sigma = cfg.magnitude_sigma
        magnitudes = torch.exp(torch.randn(len(r), generator=gen) * sigma - sigma * sigma / 2)
        codes = torch.zeros(rows, n)
        codes[r, c] = magnitudes
        x = codes @ self.dictionary
        x += self.bias
        if cfg.noise_std > 0:
            x += torch.randn(rows, cfg.d_in, generator=gen) * cfg.noise_std
        return x, codes

    def rows(self, stream: str, rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[Tensor, Tensor]]:
        """`rows` rows of one stream in chunks, each chunk from its own seeded generator."""
        for chunk, start in enumerate(range(0, rows, chunk_rows)):
            yield self.sample(min(chunk_rows, rows - start), generator(self.config.seed, stream, chunk))

    # ---- storage: truth.safetensors (the tensors) + truth.json (the setting); no pickle ----------------
    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).contiguous() for name in self.TENSORS}

    def fingerprint(self) -> str:
        """sha256 over the truth's tensors: the same setting and seed give the same fingerprint."""
        digest = hashlib.sha256()
        for name, tensor in self.tensors().items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_tensors(cls, cfg: SynthConfig, tensors: dict[str, Tensor], where: Path) -> Truth:
        missing = [name for name in cls.TENSORS if name not in tensors]
        if missing:
            raise UserError(f"{where}: no {missing[0]!r} tensor; not a synthetic truth written by `saepipe synth`")
        truth = cls(cfg, **{name: tensors[name] for name in cls.TENSORS})
        if tuple(truth.dictionary.shape) != (cfg.n_features, cfg.d_in):
            raise UserError(f"{where}: dictionary is {tuple(truth.dictionary.shape)}, the setting says "
                            f"({cfg.n_features}, {cfg.d_in}); the truth files disagree, regenerate them")
        return truth
