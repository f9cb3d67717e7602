"""Where each stage's outputs live, computed once here so stages (and dvc.yaml's `${...}` paths) agree.

Per-run outputs sit in `<output_dir>/<run_name>/`. A training run's folder holds three siblings, so that
DVC's persisted checkpoints and the git-tracked metrics never contain one another and a second run never
writes into the first one's files:

    <train.output_dir>/<run_name>/checkpoints/   checkpoint_epoch<N>.pt/, best_model.pt/ (resume, export)
    <train.output_dir>/<run_name>/live/          dvclive: metrics.json, plots/metrics/<name>.tsv
    <train.output_dir>/<run_name>/wandb/         W&B's local files, with W&B on (not tracked)

The export goes to `<export.output_dir>/<run_name>/`, the analyses to `<evaluate.output_dir>/<run_name>/`.
A null `train.run_name` is derived before any of these is asked for (`activations.run_name`); this module
imports only the config.
"""

from __future__ import annotations

from pathlib import Path

from saepipe.config import Params

# Every file a stage writes for a later one, named here once (relative to the folder shown); the stages, the
# report and the benchmarks import these names. The formats' inner layouts stay with their owners
# (`sae.formats`, `analysis.activation_db`, `training.checkpoints`).

# <process.output_dir>/
TEXTS, LABELS, CORPUS_STATS = "texts.json", "labels.json", "stats.json"
# <activations.output_dir>/: the cache (or a manifest over shards/ in parts/) and its statistics
ACTIVATION_CACHE, SHARDS, ACTIVATION_STATS = "activations.h5", "parts", "stats.json"
SHARDS_NOTE = "README.txt"  # in parts/: what the folder is for (never empty: DVC warns of an empty dep)
# <train.output_dir>/<run_name>/, and in live/ the file dvclive names (a DVC output in git, not metrics)
CHECKPOINTS, LIVE = "checkpoints", "live"
LIVE_METRICS = "metrics.json"
# <export.output_dir>/<run_name>/ (`sae.formats` writes them)
EXPORT_CONFIG, EXPORT_HISTORY = "config.json", "history.json"
EXPORT_WEIGHTS, SAELENS_WEIGHTS = "weights.pt", "sae_weights.safetensors"
# <analysis>/quick/ (evaluate)
QUICK = "quick"
QUICK_METRICS, QUICK_HEADLINE, QUICK_DENSITY = "metrics.json", "headline.json", "feature_density.npy"
QUICK_DEAD, QUICK_HISTOGRAM = "dead_features.json", "density_histogram.json"
QUICK_HISTOGRAM_PNG = "density_histogram.png"
# <analysis>/ (activation-db)
ACTIVATION_DB = "activation_db.h5"
# <analysis>/matrices/, and two files beside it (matrices)
MATRICES = "matrices"
SIMILARITY, COOCCURRENCE, JACCARD = "feature_similarity.npy", "feature_cooccurrence.npy", \
    "feature_cooccurrence_jaccard.npy"
SIMILARITY_TOPK, COOCCURRENCE_TOPK, MATRICES_METADATA = "similarity_topk.npz", "cooccurrence_topk.npz", "metadata.json"
MATRICES_METRICS, SIMILARITY_HISTOGRAM = "matrices_metrics.json", "decoder_similarity_histogram.json"
# <analysis>/ (summarize)
SUMMARIES, SUMMARY_INDEX = "feature_summaries.jsonl", "summary_index.json"
# <analysis>/interp/ (interp)
INTERP = "interp"
PROBING, PROBING_FEATURES = "probing.json", "probing_features.json"
AUTOINTERP, EXPLANATIONS = "autointerp.json", "explanations.jsonl"
# <analysis>/report/ and beside it (report)
REPORT, RUN_SUMMARY, TRAINING_CURVES = "report", "run_summary.json", "training_curves.json"


def run_path(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / run_name


def activation_cache(params: Params) -> Path:
    return Path(params.activations.output_dir) / ACTIVATION_CACHE


def run_name(params: Params) -> str:
    """`train.run_name`; a null one is filled in before any per-run path is asked for
    (`activations.run_name.names_run`), so reaching here without it is a bug, not a user error."""
    if params.train.run_name is None:
        raise ValueError("train.run_name is null: the stage must be decorated with @names_run")
    return params.train.run_name


def run_dir(params: Params) -> Path:
    """The training run's folder: `<train.output_dir>/<run_name>/`."""
    return run_path(params.train.output_dir, run_name(params))


def checkpoints_dir(params: Params) -> Path:
    return run_dir(params) / CHECKPOINTS


def live_dir(params: Params) -> Path:
    """dvclive's folder for this run (dvc.yaml's train metrics and plots point here)."""
    return run_dir(params) / LIVE


def export_dir(params: Params) -> Path:
    return run_path(params.export.output_dir, run_name(params))


def evaluated_sae(params: Params) -> Path:
    """The SAE that `evaluate` (and the analyses after it) read: `evaluate.sae_path`, else this run's export."""
    return Path(params.evaluate.sae_path) if params.evaluate.sae_path else export_dir(params)


def analysis_dir(params: Params) -> Path:
    """`<evaluate.output_dir>/<the evaluated SAE's folder name>/`: every analysis of that SAE."""
    return run_path(params.evaluate.output_dir, evaluated_sae(params).name)


def quick_dir(params: Params) -> Path:
    return analysis_dir(params) / QUICK


def activation_db(params: Params) -> Path:
    return analysis_dir(params) / ACTIVATION_DB


def matrices_dir(params: Params) -> Path:
    return analysis_dir(params) / MATRICES


def summaries_file(params: Params) -> Path:
    return analysis_dir(params) / SUMMARIES


def interp_dir(params: Params) -> Path:
    return analysis_dir(params) / INTERP


def report_dir(params: Params) -> Path:
    """`report`'s folder: plots, run_summary.json, README.md and the feature browser."""
    return analysis_dir(params) / REPORT


def training_curves(params: Params) -> Path:
    """The training curves as a DVC plot, beside the report folder (a DVC out of its own)."""
    return analysis_dir(params) / TRAINING_CURVES


def texts_file(params: Params) -> Path:
    return Path(params.process.output_dir) / TEXTS


def labels_file(params: Params) -> Path:
    return Path(params.process.output_dir) / LABELS
