"""Where each stage's outputs live, computed once here so stages (and dvc.yaml's `${...}` paths) agree.

Per-run outputs sit in `<output_dir>/<run_name>/`. A training run's folder holds three siblings, so that
DVC's persisted checkpoints and the git-tracked metrics never contain one another and a second run never
writes into the first one's files:

    <train.output_dir>/<run_name>/checkpoints/   checkpoint_epoch<N>.pt/, best_model.pt/ (resume, export)
    <train.output_dir>/<run_name>/live/          dvclive: metrics.json, plots/metrics/<name>.tsv
    <train.output_dir>/<run_name>/wandb/         W&B's local files, with W&B on (not tracked)

The export goes to `<export.output_dir>/<run_name>/`, the analyses to `<evaluate.output_dir>/<run_name>/`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from saepipe.config import Params
from saepipe.errors import UserError, field_error

ACTIVATION_CACHE = "activations.h5"
CHECKPOINTS = "checkpoints"
LIVE = "live"


def run_path(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / run_name


def activation_cache(params: Params) -> Path:
    return Path(params.activations.output_dir) / ACTIVATION_CACHE


def run_name(params: Params) -> str:
    """`train.run_name`, or, when it is null, the name `derived_run_name` gives this run.

    Inside a DVC stage (DVC sets DVC_STAGE) null is refused: dvc.yaml interpolates `${train.run_name}` into its
    paths and cannot compute a name, so the stage would write where DVC does not look.
    """
    if params.train.run_name is not None:
        return params.train.run_name
    if os.environ.get("DVC_STAGE"):
        raise field_error("train.run_name", None, "a name inside a DVC stage (dvc.yaml interpolates it into its "
                          "paths); null derives one only for ad-hoc `saepipe` runs")
    return derived_run_name(params)


def derived_run_name(params: Params) -> str:
    """`<model>.L<layer>.<hook>.<sae_type>.x<expansion>.k<topk>` (`.s<sparsity_penalty>` instead of `.k` for
    architectures without k), e.g. `smollm2-135m-instruct.L15.resid_post.batch_topk.x8.k32`.

    Model, layer and hook come from the activation cache's attributes (what the SAE is trained on, the middle
    layer resolved), the rest from `train`: two runs that differ in any of them get different folders.
    """
    from saepipe.activations.cache import ActivationCache
    from saepipe.sae import config_class

    path = activation_cache(params)
    if not path.is_file():
        raise UserError(f"train.run_name is null and {path} does not exist to name the run from; "
                        "run `saepipe activations` first or set train.run_name")
    with ActivationCache(path) as cache:
        attrs = cache.attrs
    sae = params.train.sae
    model = re.sub(r"[^a-z0-9._-]+", "-", str(attrs["model_name"]).rstrip("/").rsplit("/", 1)[-1].lower())
    hook = str(attrs["hook_name"]).removeprefix("hook_")
    uses_k = "k" in {f.name for f in dataclasses.fields(config_class(sae.sae_type))}
    sparsity = f"k{sae.topk}" if uses_k else f"s{params.train.sparsity_penalty:g}"
    model = model.lstrip(".") or "model"
    return f"{model}.L{int(attrs['hook_layer'])}.{hook}.{sae.sae_type}.x{sae.sae_expansion}.{sparsity}"


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


def with_run_name(params: Params) -> Params:
    """`params` with `train.run_name` filled in (derived when null), for code that records the name."""
    if params.train.run_name is not None:
        return params
    return dataclasses.replace(params, train=dataclasses.replace(params.train, run_name=run_name(params)))
