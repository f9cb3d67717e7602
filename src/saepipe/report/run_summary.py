"""run_summary.json: a run's headline metrics, params, versions and artifact paths, for scripts.

Every number is copied from the file an earlier stage wrote (the export's history, evaluate's metrics.json,
the matrices stage's metrics), never recomputed, so the summary and its sources cannot disagree.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any

FORMAT = "saepipe.run_summary"
FORMAT_VERSION = 1
PACKAGES = ("saepipe", "torch", "transformer-lens", "transformers", "numpy", "scipy", "h5py", "matplotlib", "dvc")


@dataclass(frozen=True)
class Headline:
    """One headline figure: where it comes from and what it means, in one sentence."""

    name: str
    source: tuple[str, ...]
    """Keys into {"training": final epoch, "evaluate": metrics.json, "matrices": matrices_metrics.json}."""
    label: str
    meaning: str
    spec: str = ".4g"


HEADLINES = (
    Headline("fvu", ("evaluate", "reconstruction", "fvu"), "FVU",
             "The fraction of the activations' variance the reconstruction misses (0 is perfect, 1 is no better "
             "than predicting the mean activation)."),
    Headline("explained_variance", ("evaluate", "reconstruction", "explained_variance"), "explained variance",
             "1 - FVU: the share of the activations' variance the SAE reconstructs."),
    Headline("cos_sim", ("evaluate", "reconstruction", "cos_sim"), "cosine similarity",
             "The mean cosine between an activation and its reconstruction (1: same direction)."),
    Headline("l0_mean", ("evaluate", "sparsity", "l0_mean"), "L0",
             "Features active on a token, on average: how sparse the code is.", ".1f"),
    Headline("dead_feature_percentage", ("evaluate", "sparsity", "dead_feature_percentage"), "dead features (%)",
             "Features that never fire on the evaluated tokens: capacity the SAE does not use.", ".2f"),
    Headline("ce_loss_recovered", ("evaluate", "ablation", "ce_loss_recovered"), "CE loss recovered",
             "With the reconstruction spliced in, the share of the next-token loss lost by zeroing the hook "
             "that comes back (1: as good as the clean model, 0: as bad as zeroing)."),
    Headline("ce_loss_increase", ("evaluate", "ablation", "ce_loss_increase"), "CE loss increase (nats)",
             "How much worse the model predicts the next token with the reconstruction than with the real "
             "activation."),
    Headline("kl_sae", ("evaluate", "ablation", "kl_sae"), "KL with SAE (nats)",
             "How far the model's next-token distribution moves from the clean one when the reconstruction "
             "replaces the activation."),
    Headline("mean_max_cosine", ("matrices", "mean_max_cosine"), "mean max decoder cosine",
             "Each feature's cosine to its most similar other feature, averaged: near 1 means duplicated features.",
             ".3f"),
    Headline("pairs_above_threshold", ("matrices", "pairs_above_threshold"), "near-duplicate pairs",
             "Feature pairs whose decoder directions have a cosine above the matrices stage's threshold.", ","),
    Headline("mean_jaccard_top1", ("matrices", "cooccurrence", "mean_jaccard_top1"), "mean top-1 Jaccard",
             "How much each feature's most frequent partner fires on the same tokens (Jaccard index), averaged "
             "over features: high values mean features that split one concept.", ".3f"),
    Headline("train_loss", ("training", "loss"), "final training loss",
             "The training objective in the last epoch, on normalised activations."),
    Headline("val_loss", ("training", "val_loss"), "final validation loss",
             "The same objective on the held-out split, through the inference path."),
)


def lookup(sources: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` in the nested sources, None where a stage did not produce it (e.g. no ablation)."""
    value: Any = sources
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def headline_values(sources: dict[str, Any]) -> dict[str, Any]:
    return {h.name: lookup(sources, h.source) for h in HEADLINES}


def versions() -> dict[str, Any]:
    """Installed versions of what the pipeline runs on (None for a package that is not installed)."""
    found: dict[str, Any] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def metric_sources(history: list[dict[str, Any]], metrics: dict[str, Any],
                   matrices_metrics: dict[str, Any]) -> dict[str, Any]:
    """The three sources of figures, keyed as `Headline.source` reads them."""
    evaluate = {k: v for k, v in metrics.items() if k not in ("formulas", "evaluated")}
    return {"training": history[-1], "evaluate": evaluate, "matrices": matrices_metrics}


def build_summary(*, run_name: str, config: dict[str, Any], history: list[dict[str, Any]],
                  metrics: dict[str, Any], matrices_metrics: dict[str, Any], db_attrs: dict[str, Any],
                  features: dict[str, Any], params: dict[str, Any], artifacts: dict[str, str],
                  browser: dict[str, Any], probing: dict[str, Any] | None = None,
                  autointerp: dict[str, Any] | None = None) -> dict[str, Any]:
    sources = metric_sources(history, metrics, matrices_metrics)
    interp = {"probing": {k: v for k, v in probing.items() if k != "procedure"} if probing else None,
              "autointerp": autointerp}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_name": run_name,
        "sae": {key: config.get(key) for key in ("sae_type", "d_in", "d_sae", "k", "model_name", "hook",
                                                  "checkpoint")},
        "data": {**config.get("data", {}), "activation_db_rows": db_attrs.get("n_rows"),
                 "texts_sha256": db_attrs.get("texts_sha256")},
        "headline": headline_values(sources),
        "metrics": {"training": {"epochs": len(history), "final": history[-1]},
                    "evaluate": sources["evaluate"], "matrices": matrices_metrics,
                    **({"interp": interp} if probing or autointerp else {})},
        "features": features,
        "params": params,
        "versions": {"installed": versions(), "trained_with": config.get("code"),
                     "exported_with": config.get("exported_with")},
        "artifacts": artifacts,
        "browser": browser,
    }
