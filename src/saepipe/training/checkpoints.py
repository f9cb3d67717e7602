"""Checkpoints, laid out as the predecessor did: directories that end in `.pt`.

    <train.output_dir>/<run_name>/checkpoints/   (saepipe.paths.checkpoints_dir)
        checkpoint_epoch<N>.pt/     every `checkpoint_freq` epochs and the last one; the newest
                                    `keep_checkpoints` of them stay
        best_model.pt/              the epoch with the lowest validation loss
        history.json                per-epoch metrics so far

Each checkpoint directory holds:
    sae.safetensors        the module's parameters and buffers (training space: normalised inputs)
    sae_config.json        SAEConfig, enough to rebuild the module
    state.json             epoch, step, tokens seen, best validation loss and its epoch, run info (model,
                           hook, scale, data and code versions)
    optimizer.pt           the optimizer's state dict, the dead-latent counters (tokens seen when each
                           latent last fired) and torch's RNG state: plain tensors and numbers, loadable
                           with torch.load(weights_only=True)
    history.json           metrics up to that epoch
No pickle anywhere: a checkpoint from someone else cannot run code on load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saepipe.errors import UserError
from saepipe.sae import SparseAutoencoder, build_sae, config_from_dict
from saepipe.sae.provenance import RunRecord
from saepipe.storage import atomic_dir, load_safetensors, load_tensors, read_json
from saepipe.training.guards import check_finite_weights

BEST = "best_model.pt"
EPOCH_RE = re.compile(r"^checkpoint_epoch(\d+)\.pt$")


@dataclass
class Checkpoint:
    sae: SparseAutoencoder
    state: dict[str, Any]
    history: list[dict[str, float]]
    tensors: dict[str, Any]  # optimizer.pt: optimizer state, dead-latent counters, torch RNG state
    path: Path

    def run_record(self) -> RunRecord:
        try:
            return RunRecord.from_dict(self.state["run"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{self.path}: state.json has no run record; retrain with this saepipe version") from None

    def identity(self) -> dict[str, Any]:
        """What an export records of the checkpoint it came from."""
        return {"name": self.path.name, **{k: self.state.get(k) for k in ("epoch", "step", "tokens_seen")}}


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"checkpoint_epoch{epoch}.pt"


def save_checkpoint(path: Path, sae: SparseAutoencoder, state: dict[str, Any], history: list[dict[str, float]],
                    tensors: dict[str, Any]) -> None:
    """Write a checkpoint directory atomically (temporary name, then rename); never one with NaN or Inf weights."""
    check_finite_weights(sae.state_dict(), f"{path} (epoch {state.get('epoch')}, step {state.get('step')})")
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, tmp / "sae.safetensors")
        (tmp / "sae_config.json").write_text(json.dumps(sae.cfg.to_dict(), indent=2) + "\n")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        torch.save(tensors, tmp / "optimizer.pt")
        for file in tmp.iterdir():
            file.chmod(0o644)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    needed = ("sae.safetensors", "sae_config.json", "state.json", "history.json", "optimizer.pt")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
    try:
        cfg = config_from_dict(read_json(path / "sae_config.json", "checkpoint SAE config"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path / 'sae_config.json'}: not an SAE config ({type(exc).__name__}: {exc})") from None
    sae = build_sae(cfg)
    weights = load_safetensors(path / "sae.safetensors", "train", device=str(map_location))
    try:
        sae.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path / 'sae.safetensors'}: does not match {path / 'sae_config.json'} ({first})") from None
    tensors = load_tensors(path / "optimizer.pt", "optimizer state", "train", map_location)
    return Checkpoint(
        sae=sae,
        state=read_json(path / "state.json", "checkpoint state"),
        history=read_json(path / "history.json", "checkpoint history"),
        tensors=tensors,
        path=path,
    )


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """The `checkpoint_epoch<N>.pt` directories of a run, oldest epoch first."""
    if not run_dir.is_dir():
        return []
    epochs = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := EPOCH_RE.match(p.name)) and p.is_dir())
    return [path for _, path in epochs]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-epoch `checkpoint_epoch<N>.pt` that is complete, if any."""
    return next((path for path in reversed(epoch_checkpoints(run_dir)) if (path / "state.json").is_file()), None)
