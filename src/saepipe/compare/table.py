"""The comparison table: the params that tell runs apart, seed groups, the noise rule, winners, the Pareto front.

Pure functions over `Run`s (`compare.runs`): nothing here reads a file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEED = "train.seed"
NOISE_SDS = 2.0
"""A difference between two configurations smaller than this many times the larger group's sd is seed noise."""

HEADLINE = ("fvu", "l0", "dead_pct", "ce_recovered", "kl")
"""evaluate's headline.json."""
PROBING = ("subject_k1", "subject_k5", "chapter_k1", "chapter_k5")
"""interp's probing.json: sparse-probe accuracy with 1 and 5 features."""
AUTOINTERP = ("baseline_detection", "baseline_fuzzing", "detection", "fuzzing")
"""interp's autointerp.json: the token baseline (every run has it), and the LLM explainer's scores (when one ran)."""
HIGHER_IS_BETTER = {"fvu": False, "l0": None, "dead_pct": False, "ce_recovered": True, "kl": False,
                    **dict.fromkeys(PROBING + AUTOINTERP, True)}
"""Every figure a row may carry and which way is better (None: neither; L0 is the budget, not a score)."""


NOT_CONFIGURATION = ("train.run_name", "evaluate.sae_path")
WHERE_SUFFIXES = ("output_dir", ".output", ".raw_dir", ".data_path", ".local_path", ".device")


def configuration(params: dict[str, Any]) -> dict[str, Any]:
    """The params that say what a run is, not what it is called or where its files and compute were: a run's
    name, output paths and devices never tell two configurations apart."""
    return {k: v for k, v in params.items() if k not in NOT_CONFIGURATION and not k.endswith(WHERE_SUFFIXES)}


def differing_params(params: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every run (a key some runs lack counts as differing)."""
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({_hashable(p.get(k)) for p in params}) > 1]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Group:
    """Runs that differ only in `train.seed`: one configuration, measured once per seed."""

    config: dict[str, Any]
    """The differing params other than the seed (what sets this configuration apart)."""
    members: list[str]
    mean: dict[str, float]
    sd: dict[str, float]
    """Sample sd over the seeds (0 with one seed: no noise estimate)."""

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.config.items()) or "(all)"


def seed_groups(names: Sequence[str], params: Sequence[dict[str, Any]],
                metrics: Sequence[dict[str, float | None]]) -> list[Group]:
    """Group runs by every differing param but the seed; mean and sd of each metric over a group's seeds."""
    keys = [k for k in differing_params(params) if k != SEED]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(tuple(_hashable(p.get(k)) for k in keys), []).append(i)
    out = []
    for members in groups.values():
        mean, sd = {}, {}
        for metric in HIGHER_IS_BETTER:
            values = [metrics[i][metric] for i in members if _finite(metrics[i].get(metric))]
            if values:
                mean[metric] = statistics.fmean(values)
                sd[metric] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(Group(config={k: params[members[0]].get(k) for k in keys}, members=[names[i] for i in members],
                         mean=mean, sd=sd))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def within_noise(a: Group, b: Group, metric: str, sds: float = NOISE_SDS) -> bool | None:
    """Whether the two configurations' difference in `metric` is within seed noise: |mean_a - mean_b| below
    `sds` x the larger of their sds. None when either group has a single seed (no noise estimate) or no value."""
    if metric not in a.mean or metric not in b.mean or len(a.members) < 2 or len(b.members) < 2:
        return None
    return abs(a.mean[metric] - b.mean[metric]) < sds * max(a.sd[metric], b.sd[metric])


def winners(names: Sequence[str], metrics: Sequence[dict[str, float | None]]) -> dict[str, str]:
    """Per metric with a direction, the run that does best (ties: the first)."""
    out = {}
    for metric, higher in HIGHER_IS_BETTER.items():
        scored = [(m[metric], n) for n, m in zip(names, metrics, strict=True) if _finite(m.get(metric))]
        if higher is None or not scored:
            continue
        best = max(scored, key=lambda s: s[0]) if higher else min(scored, key=lambda s: s[0])
        out[metric] = best[1]
    return out


def pareto_front(l0: Sequence[float], score: Sequence[float], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point dominates: as sparse or sparser and as good or better, strictly
    better in one. Sorted by L0."""
    sign = 1.0 if higher_is_better else -1.0
    points = [(x, sign * y if _finite(y) else None) for x, y in zip(l0, score, strict=True)]
    front = [i for i, (x, y) in enumerate(points)
             if _finite(x) and _finite(y) and not any(
                 j != i and _finite(xj) and _finite(yj) and xj <= x and yj >= y and (xj < x or yj > y)
                 for j, (xj, yj) in enumerate(points))]
    return sorted(front, key=lambda i: l0[i])
