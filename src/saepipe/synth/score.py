"""Score an SAE against a synthetic truth: did it find the features that are really there?

Directions (decoder only): each true feature is matched to the latent whose decoder row has the highest
cosine with it (true -> learned; several true features may share a latent).
    mcc          mean over true features of that best cosine ("mean max cosine")
    recovered    fraction of true features whose best cosine is >= RECOVERED_COSINE (0.9)
    mcc_learned  the other direction: mean over latents of their best cosine with any true feature
Codes, on `rows` fresh rows drawn from the truth (stream "score": neither train nor validation rows):
    f1           for each true feature, F1 of (its matched latent fires) against (the feature fires), mean
                 over the features that fire in the sample; f1_all counts a feature that never fires as 1
                 if its latent never fires either, else 0
    shrinkage    for each recovered feature, sum of the latent's contribution along the true direction
                 (activation x decoder row . true direction) over the rows where both fire, divided by the
                 true magnitudes summed over those rows; the median over recovered features.
                 1 is exact, < 1 means the SAE shrinks what it reconstructs
    fvu, l0      fraction of variance unexplained and mean active latents per row, on the same rows
Chance: `chance_mcc(d_in, d_sae)` is the expected best cosine of one fixed direction with d_sae random
unit vectors, what a randomly initialised decoder scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saepipe.errors import UserError
from saepipe.synth.generate import CHUNK_ROWS, Truth

RECOVERED_COSINE = 0.9
SCORE_ROWS = 50_000
COSINE_BLOCK = 4096


@dataclass
class Score:
    """The metrics (`summary()`), and the matching they came from."""

    matched: Tensor
    """[n_features] the latent each true feature was matched to"""
    best_cosine: Tensor
    """[n_features] its decoder cosine"""
    f1: Tensor
    """[n_features] F1 of its firing (NaN where the feature never fires in the sample)"""
    shrinkage: Tensor
    """[n_features] learned / true magnitude on co-firing rows (NaN where not recovered or never co-firing)"""
    metrics: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return dict(self.metrics)


def unit_rows(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def best_cosines(true: Tensor, learned: Tensor, block: int = COSINE_BLOCK) -> tuple[Tensor, Tensor]:
    """For each row of `true`, the highest cosine with any row of `learned` and that row's index (in blocks
    of `block` true rows, so the cosine matrix never exceeds block x len(learned))."""
    learned = unit_rows(learned.float())
    values, index = [], []
    for start in range(0, len(true), block):
        cos = unit_rows(true[start : start + block].float()) @ learned.t()
        best = cos.max(dim=1)
        values.append(best.values)
        index.append(best.indices)
    return torch.cat(values), torch.cat(index)


def chance_mcc(d_in: int, d_sae: int, grid: int = 200_001) -> float:
    """E[max of d_sae cosines of a fixed unit vector with independent uniform unit vectors in R^d_in].

    One cosine t has density proportional to (1 - t^2)^((d_in - 3) / 2) on [-1, 1]; with F its CDF,
    E[max] = integral of t d(F(t)^d_sae) = 1 - integral of F(t)^d_sae dt over [-1, 1]."""
    t = torch.linspace(-1, 1, grid, dtype=torch.float64)
    log_density = (d_in - 3) / 2 * torch.log1p(-t[1:-1] ** 2)
    density = torch.zeros_like(t)
    density[1:-1] = torch.exp(log_density - log_density.max())
    cdf = torch.cumsum((density[1:] + density[:-1]) / 2, 0)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf / cdf[-1]])
    powered = cdf.pow(d_sae)
    step = 2 / (grid - 1)
    return float(1 - ((powered[1:] + powered[:-1]) / 2).sum() * step)


@torch.no_grad()
def score_sae(sae: Any, truth: Truth, rows: int = SCORE_ROWS, batch_rows: int = CHUNK_ROWS,
              progress: bool = False) -> Score:
    """Score `sae` (W_dec [d_sae, d_in], encode(raw x) and decode, as `load_sae` gives) against `truth`."""
    cfg = truth.config
    W_dec = sae.W_dec.detach().float().cpu()
    if W_dec.ndim != 2 or W_dec.shape[1] != cfg.d_in:
        raise UserError(f"the SAE's decoder is {tuple(W_dec.shape)}, the truth has d_in {cfg.d_in}: "
                        "score an SAE trained on this setting's cache")
    if rows < 1:
        raise UserError(f"--rows={rows}: expected an integer >= 1")
    dictionary = truth.dictionary
    best, matched = best_cosines(dictionary, W_dec)
    learned_best, _ = best_cosines(W_dec, dictionary)
    # the matched latent's decoder row, projected on the true direction: its contribution per unit activation
    along = (W_dec[matched] * dictionary).sum(1)
    n = cfg.n_features
    tp, pred, actual = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    learned_mass, true_mass = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    sq_err, x_sum, x_sq, l0, seen = 0.0, torch.zeros(cfg.d_in, dtype=torch.float64), 0.0, 0.0, 0
    batches = truth.rows("score", rows, batch_rows)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-rows // batch_rows), desc="score", unit="batch")
    for x, codes in batches:
        features = sae.encode(x).float()
        x_hat = sae.decode(features).float()
        sq_err += float((x - x_hat).double().pow(2).sum())
        x_sum += x.double().sum(0)
        x_sq += float(x.double().pow(2).sum())
        l0 += float((features != 0).sum())
        seen += len(x)
        latent = features[:, matched]
        fires, true_fires = latent > 0, codes > 0
        both = fires & true_fires
        tp += both.sum(0)
        pred += fires.sum(0)
        actual += true_fires.sum(0)
        learned_mass += torch.where(both, latent, 0).sum(0, dtype=torch.float64)
        true_mass += torch.where(both, codes, 0).sum(0, dtype=torch.float64)
    total_var = x_sq - float(x_sum.pow(2).sum()) / seen
    f1 = torch.where(actual > 0, 2 * tp / (pred + actual).clamp_min(1), torch.nan)
    f1_all = torch.where(actual > 0, f1, (pred == 0).double())
    recovered = best >= RECOVERED_COSINE
    shrinkage = torch.where(recovered & (true_mass > 0), learned_mass * along.double() / true_mass.clamp_min(1e-12),
                            torch.nan)
    fired = ~torch.isnan(f1)
    shrunk = shrinkage[~torch.isnan(shrinkage)]
    metrics = {
        "mcc": float(best.mean()),
        "recovered": float(recovered.double().mean()),
        "mcc_learned": float(learned_best.mean()),
        "f1": float(f1[fired].mean()) if fired.any() else float("nan"),
        "f1_all": float(f1_all.mean()),
        "shrinkage": float(shrunk.median()) if len(shrunk) else float("nan"),
        "fvu": sq_err / total_var if total_var > 0 else float("nan"),
        "l0": l0 / seen,
        "chance_mcc": chance_mcc(cfg.d_in, W_dec.shape[0]),
        "rows": seen,
        "n_features": n,
        "d_sae": int(W_dec.shape[0]),
        "features_firing": int(fired.sum()),
        "latents_matched": int(matched.unique().numel()),
    }
    return Score(matched, best, f1.float(), shrinkage.float(), metrics)
