"""Where each stage's outputs live, computed once here so stages (and dvc.yaml's `${...}` paths) agree.

Per-run outputs sit in `<output_dir>/<run_name>/`: checkpoints, the export, the analyses.
"""

from __future__ import annotations

from pathlib import Path

from saepipe.config import Params

ACTIVATION_CACHE = "activations.h5"


def run_path(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / run_name


def activation_cache(params: Params) -> Path:
    return Path(params.activations.output_dir) / ACTIVATION_CACHE


def checkpoints_dir(params: Params) -> Path:
    return run_path(params.train.output_dir, params.train.run_name)


def export_dir(params: Params) -> Path:
    return run_path(params.export.output_dir, params.train.run_name)


def evaluated_sae(params: Params) -> Path:
    """The SAE that `evaluate` (and the analyses after it) read: `evaluate.sae_path`, else this run's export."""
    return Path(params.evaluate.sae_path) if params.evaluate.sae_path else export_dir(params)


def analysis_dir(params: Params) -> Path:
    """`<evaluate.output_dir>/<the evaluated SAE's folder name>/`: every analysis of that SAE."""
    return run_path(params.evaluate.output_dir, evaluated_sae(params).name)


def activation_db(params: Params) -> Path:
    return analysis_dir(params) / "activation_db.h5"


def matrices_dir(params: Params) -> Path:
    return analysis_dir(params) / "matrices"


def interp_dir(params: Params) -> Path:
    return analysis_dir(params) / "interp"


def report_dir(params: Params) -> Path:
    """`report`'s folder: plots, run_summary.json, README.md and the feature browser."""
    return analysis_dir(params) / "report"


def training_curves(params: Params) -> Path:
    """The training curves as a DVC plot, beside the report folder (a DVC out of its own)."""
    return analysis_dir(params) / "training_curves.json"
