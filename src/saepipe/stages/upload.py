"""Stage `upload`: an already exported models/sae/<run_name>/ -> the Hugging Face hub (no re-export)."""

from __future__ import annotations

from saepipe.activations.run_name import names_run
from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.paths import export_dir
from saepipe.publish.hf import publish_export


@names_run
def run(params: Params) -> None:
    sae_dir = export_dir(params)
    if not sae_dir.is_dir():
        raise UserError(f"no exported SAE at {sae_dir}: run `saepipe export` first")
    publish_export(sae_dir, params.export.hf_repo_id, params.export.hf_private)
