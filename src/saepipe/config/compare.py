"""Params of `saepipe compare`: where the comparison goes and how features are matched across runs."""

from __future__ import annotations

from dataclasses import dataclass

from saepipe.config.fields import check_positive
from saepipe.errors import field_error


@dataclass(frozen=True)
class CompareConfig:
    """Finished runs -> <output_dir>/: compare.json, README.md, frontier.png; features/<A>--<B>/ per match."""

    output_dir: str
    """Where the comparison is written."""
    noise_sds: float
    """Seed noise: two configurations whose means differ by less than this many times the larger seed sd."""
    match_candidates: int
    """Feature matching: each latent's best few latents of the other run that the one-to-one matching chooses
    among (more: closer to the exact assignment, slower)."""
    split_cosine: float
    """Feature matching: a latent of the other run at this decoder cosine or more shares out the latent's
    direction (its splits, for a narrower run against a wider one)."""

    def validate(self) -> None:
        check_positive("compare", {"noise_sds": self.noise_sds, "match_candidates": self.match_candidates})
        if not 0 < self.split_cosine < 1:
            raise field_error("compare.split_cosine", self.split_cosine, "a number in (0, 1)")
