"""Stage `export`: a training run's checkpoint -> models/sae/<run_name>/ in saepipe's and SAELens's formats."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from saepipe.activations.run_name import names_run
from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.paths import checkpoints_dir, export_dir
from saepipe.publish.hf import final_metrics, resolve_repo_id, resolve_token
from saepipe.sae.formats import CONFIG, HISTORY, export_sae
from saepipe.storage import read_json
from saepipe.training.checkpoints import BEST, load_checkpoint, newest_checkpoint


def pick_checkpoint(run_dir: Path, which: str) -> Path:
    """best_model.pt, or the newest complete checkpoint_epochN.pt for `last`."""
    if which == "best":
        path = run_dir / BEST
        if not (path / "state.json").is_file():
            raise UserError(f"no {BEST} in {run_dir}: run `saepipe train` first (or export --checkpoint last)")
        return path
    path = newest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"no checkpoint_epoch<N>.pt in {run_dir}: run `saepipe train` first")
    return path


def check_finished(run_dir: Path) -> None:
    """Refuse a run that stopped before its last epoch (killed, or failed): its best epoch so far is not the
    result the params ask for. The newest checkpoint records how many epochs its run was to train."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return
    state = read_json(newest / "state.json", "checkpoint state")
    planned = state.get("num_epochs", ((state.get("run") or {}).get("train_config") or {}).get("num_epochs"))
    epoch = state.get("epoch")
    if isinstance(planned, int) and isinstance(epoch, int) and epoch < planned:
        raise UserError(f"{run_dir}: training stopped after epoch {epoch} of {planned} (interrupted?); finish it "
                        "with `saepipe train --resume`, then export")


def summary_line(config: dict[str, Any], history: list[dict[str, Any]], out_dir: Path, seconds: float) -> str:
    metrics = final_metrics(config, history)
    scores = ", ".join(f"{label} {metrics[key]:.4g}" for key, label in (("val_fvu", "val FVU"), ("val_l0", "val L0"))
                       if key in metrics)
    epoch = (config.get("checkpoint") or {}).get("epoch")
    return (f"exported {config['sae_type']} SAE {config['d_in']}->{config['d_sae']} on {config.get('hook')} "
            f"(epoch {epoch}{', ' + scores if scores else ''}) to {out_dir} [{seconds:.1f} s]")


@names_run
def run(params: Params) -> None:
    started = time.perf_counter()
    run_dir = checkpoints_dir(params)
    if params.export.upload_to_hf:  # before the export is written: nothing changes when the upload cannot start
        resolve_repo_id(params.export.hf_repo_id)
        resolve_token(None)
    path = pick_checkpoint(run_dir, params.export.checkpoint)
    check_finished(run_dir)
    checkpoint = load_checkpoint(path)
    out_dir = export_dir(params)
    export_sae(checkpoint.sae, checkpoint.run_record(), checkpoint.history, out_dir, checkpoint.identity())
    print(summary_line(read_json(out_dir / CONFIG, "exported SAE config"), read_json(out_dir / HISTORY, "history"),
                       out_dir, time.perf_counter() - started))
    if params.export.upload_to_hf:
        from saepipe.publish.hf import publish_export

        publish_export(out_dir, params.export.hf_repo_id, params.export.hf_private)
