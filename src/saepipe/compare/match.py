"""Which features two runs share: decoder directions matched one to one, and the latents that split a feature.

A latent's direction is its unit decoder row (what it writes into the model). For runs A and B the cosine
matrix [d_a, d_b] is computed in blocks of A's rows (float32, `block` x d_b at a time), so two 32k-latent
dictionaries never hold it whole; from each block only each A latent's `candidates` best B latents are kept.

- best: each A latent's B latent of largest cosine (several A latents may share one);
- one-to-one: greedy over the kept candidate pairs, highest cosine first, each latent used once (the Hungarian
  assignment on the full matrix does not scale to 32k x 32k; greedy equals it whenever matches are clear, and
  an A latent whose candidates were all taken is left unmatched, -1);
- splits: the B latents with cosine >= `split_cosine` to an A latent (for A narrower than B: the latents
  that share out what one A latent did);
- correlation: for matched pairs, Pearson's r of the two latents' activations over the same tokens, from two
  activation DBs built on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

METHOD = ("greedy one-to-one on decoder cosine (each A latent's {candidates} best B latents as candidates, "
          "highest cosine first, each latent used once); best = largest cosine, not one-to-one")


@dataclass(frozen=True)
class FeatureMatch:
    best: np.ndarray
    """[d_a] int64: each A latent's B latent of largest cosine."""
    best_cosine: np.ndarray
    """[d_a] float32."""
    match: np.ndarray
    """[d_a] int64: the one-to-one match, -1 when none was left."""
    cosine: np.ndarray
    """[d_a] float32: the one-to-one match's cosine (0 where unmatched)."""
    splits: list[list[tuple[int, float]]]
    """Per A latent, the B latents at cosine >= split_cosine, best first."""

    def share(self, threshold: float, among: np.ndarray | None = None) -> float:
        """Share of A latents (or of `among`, e.g. the alive ones) matched one to one at cosine >= threshold."""
        ids = np.arange(len(self.match)) if among is None else among
        return float((self.cosine[ids] >= threshold).mean()) if len(ids) else float("nan")


def unit_rows(w_dec: Tensor) -> Tensor:
    """Decoder rows as unit float32 vectors (a zero row stays zero)."""
    w = w_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_features(a: Tensor, b: Tensor, *, candidates: int = 8, split_cosine: float = 0.6,
                   block: int = 2048, progress: bool = False) -> FeatureMatch:
    """Match the unit rows `a` [d_a, d_in] to `b` [d_b, d_in] (see the module docstring)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders of different widths: {a.shape[1]} vs {b.shape[1]}")
    d_a, d_b = a.shape[0], b.shape[0]
    c = min(candidates, d_b)
    cand_ids = torch.empty(d_a, c, dtype=torch.long)
    cand_cos = torch.empty(d_a, c)
    splits: list[list[tuple[int, float]]] = []
    bt = b.t().contiguous()
    for start in tqdm(range(0, d_a, block), desc="matching", unit="block", disable=not progress):
        sims = a[start:start + block] @ bt
        values, ids = sims.topk(c, dim=1)
        cand_ids[start:start + block], cand_cos[start:start + block] = ids, values
        rows, cols = (sims >= split_cosine).nonzero(as_tuple=True)
        found: list[list[tuple[int, float]]] = [[] for _ in range(sims.shape[0])]
        for r, col, v in zip(rows.tolist(), cols.tolist(), sims[rows, cols].tolist(), strict=True):
            found[r].append((col, v))
        splits.extend(sorted(s, key=lambda p: -p[1]) for s in found)
    match, cosine = _greedy(cand_ids.numpy(), cand_cos.numpy(), d_b)
    return FeatureMatch(best=cand_ids[:, 0].numpy().astype(np.int64), best_cosine=cand_cos[:, 0].numpy(),
                        match=match, cosine=cosine, splits=splits)


def _greedy(ids: np.ndarray, cos: np.ndarray, d_b: int) -> tuple[np.ndarray, np.ndarray]:
    d_a, c = ids.shape
    order = np.argsort(-cos, axis=None, kind="stable")
    match = np.full(d_a, -1, dtype=np.int64)
    cosine = np.zeros(d_a, dtype=np.float32)
    taken = np.zeros(d_b, dtype=bool)
    rows, cols = np.divmod(order, c)
    for r, k in zip(rows.tolist(), cols.tolist(), strict=True):
        j = ids[r, k]
        if match[r] < 0 and not taken[j]:
            match[r], cosine[r], taken[j] = j, cos[r, k], True
    return match, cosine


def activation_correlation(rows_a: list[tuple[np.ndarray, np.ndarray]], rows_b: list[tuple[np.ndarray, np.ndarray]],
                           n_rows: int) -> np.ndarray:
    """Pearson's r per pair over `n_rows` tokens, each latent given as (rows it fires on, its values there);
    every other token is 0. NaN where a latent never fires (no variance)."""
    out = np.full(len(rows_a), np.nan)
    for i, ((ra, va), (rb, vb)) in enumerate(zip(rows_a, rows_b, strict=True)):
        va, vb = va.astype(np.float64), vb.astype(np.float64)
        _, ia, ib = np.intersect1d(ra, rb, assume_unique=True, return_indices=True)
        sxy = float(va[ia] @ vb[ib])
        sx, sy, sxx, syy = va.sum(), vb.sum(), va @ va, vb @ vb
        cov = sxy - sx * sy / n_rows
        var = (sxx - sx * sx / n_rows) * (syy - sy * sy / n_rows)
        if var > 0:
            out[i] = cov / np.sqrt(var)
    return out
