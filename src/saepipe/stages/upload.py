"""Stage `upload`: an already exported models/sae/<run_name>/ -> the Hugging Face hub (no re-export)."""

from __future__ import annotations

from pathlib import Path

from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.paths import export_dir
from saepipe.publish.hf import resolve_repo_id, upload_sae
from saepipe.sae.formats import load_sae


def upload(params: Params, sae_dir: Path) -> None:
    repo_id = resolve_repo_id(params.export.hf_repo_id)  # before any work: a missing repo id is the usual mistake
    load_sae(sae_dir)  # refuse a damaged export before anything leaves the machine
    url = upload_sae(sae_dir, repo_id, params.export.hf_private, path_in_repo=sae_dir.name)
    print(f"uploaded {sae_dir} to {url}{' (private)' if params.export.hf_private else ''}")


def run(params: Params) -> None:
    sae_dir = export_dir(params)
    if not sae_dir.is_dir():
        raise UserError(f"no exported SAE at {sae_dir}: run `saepipe export` first")
    upload(params, sae_dir)
