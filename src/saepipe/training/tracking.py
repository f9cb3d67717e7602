"""Experiment tracking: epoch aggregates to dvclive (always) and Weights & Biases (optional).

dvclive writes into the run's own folder (`saepipe.paths`): `<run>/live/metrics.json` (the latest value of
every metric) and `<run>/live/plots/metrics/{train,val}/<name>.tsv` (for `dvc plots`: one row per epoch at the
epoch's last training step, and in val/ also one per validation between epoch ends, `train.val_every_steps`),
so an ad-hoc run with another run name never overwrites the pipeline's tracked metrics. It runs inside the
DVC stage, so it must neither write `dvc.yaml` nor save experiments or git-commit by itself: the
pipeline declares those files and `dvc exp run` records them.

W&B gets the same epoch aggregates under `train/<name>` and `val/<name>`, the run summary at close,
and, when asked, the final exported SAE as the run's only artifact. Checkpoints are never uploaded.
With W&B off nothing from wandb is imported, so it needs neither the package nor a network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from saepipe.config import TrainConfig, flat_values
from saepipe.errors import UserError
from saepipe.paths import LIVE

SECRET_KEY = re.compile(r"api_?key|token|secret|password", re.IGNORECASE)


def wandb_name(metric: str) -> str:
    """`val_loss` -> `val/loss`; everything else is a training figure: `loss` -> `train/loss`. Both trackers
    use these names: in dvclive's metrics.json they nest as {"train": {...}, "val": {...}}, so `dvc exp show`
    columns read `train.fvu`, `val.fvu` and never collide with evaluate's headline `fvu`, `l0`."""
    return f"val/{metric[4:]}" if metric.startswith("val_") else f"train/{metric}"


class Tracker:
    """What the trainer reports to: `log_epoch` each epoch, `log_final_artifact` once, `close` at the end.

    `run_dir` is the run's folder (`saepipe.paths.run_dir`): dvclive writes `run_dir/live/`, W&B `run_dir/wandb/`
    (or `$WANDB_DIR/wandb/`). Usable as a context manager: an exception inside the block closes the run with
    status "failed".
    """

    def __init__(self, config: TrainConfig, run_dir: Path, run_info: Mapping[str, Any]):
        from dvclive import Live

        self.config = config
        self.run_dir = Path(run_dir)
        self._summary: dict[str, Any] = {}
        self._artifact_logged = False
        self._closed = False
        self._run: Any = None
        # resume continues dvclive's step and files instead of wiping them, like the trainer's checkpoints.
        self.live = Live(dir=str(self.run_dir / LIVE), resume=config.resume, save_dvc_exp=False, dvcyaml=None,
                         report=None, monitor_system=False)
        if self.wandb_enabled:
            try:
                self._run = self._init_wandb(dict(run_info))
            except BaseException:
                self.live.end()
                raise

    @property
    def wandb_enabled(self) -> bool:
        return self.config.tracking.enabled

    def _init_wandb(self, run_info: dict[str, Any]) -> Any:
        import wandb

        cfg = self.config.tracking
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        config = _scrub({**run_info, "train": flat_values(self.config)})
        try:
            return wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                mode=cfg.wandb_mode,
                group=cfg.wandb_group,
                tags=list(cfg.wandb_tags) or None,
                notes=cfg.wandb_notes,
                name=self.config.run_name,
                job_type="train",
                config=config,
                dir=str(wandb_dir),
                # No code snapshot and no job artifact: the final export is the only artifact we send.
                settings=wandb.Settings(save_code=False, disable_job_creation=True),
            )
        except Exception as exc:
            # wandb's own message (e.g. no API key in a non-interactive run) without a traceback; scrubbed
            # in case a future message quotes the key.
            reason = _redact(next(iter(str(exc).splitlines()), ""))
            raise UserError(
                f"cannot start the W&B run ({type(exc).__name__}: {reason}); run `python -m wandb login`, "
                "or set train.wandb_mode: offline (and `wandb sync` later) or train.wandb: false"
            ) from None

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One point per metric at `step`, the training step the epoch ended on (the trainer's), else at the epoch
        number; resumes continue the same axis."""
        values = {name: float(value) for name, value in metrics.items()}
        at = epoch if step is None else step
        self._log(at, values)
        if self._run is not None:
            self._run.log({"epoch": epoch, **{wandb_name(k): v for k, v in values.items()}}, step=at)
        for name in ("loss", "val_loss"):
            if name in values:
                self._summary[f"final_{name}"] = values[name]

    def log_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """A validation between epoch ends: its `val_` figures at training step `step`, on the epochs' curves."""
        values = {name: float(value) for name, value in metrics.items() if name.startswith("val_")}
        self._log(step, values)
        if self._run is not None:
            self._run.log({wandb_name(k): v for k, v in values.items()}, step=step)

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(wandb_name(name), value)
        self.live.next_step()

    def log_final_artifact(self, export_dir: Path) -> None:
        """Record where the final SAE is; upload it as a W&B model artifact if `wandb_log_final_artifact`."""
        export_dir = Path(export_dir)
        self._summary["local_model_path"] = str(export_dir.resolve())
        if self._run is None or not self.config.tracking.wandb_log_final_artifact:
            return
        if self._artifact_logged:
            raise RuntimeError("the final artifact is logged once per run")
        if not export_dir.is_dir():
            raise UserError(f"{export_dir} is not a directory: nothing to log as the final W&B artifact")
        if export_dir.name.endswith(".pt") or (export_dir / "optimizer.pt").exists():
            raise ValueError(f"{export_dir} is a checkpoint; only the final export is ever uploaded")
        import wandb

        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"sae-{self.config.run_name}")
        artifact = wandb.Artifact(name=name, type="model",
                                  description=f"Final exported SAE of run {self.config.run_name}",
                                  metadata={"run_name": self.config.run_name, "sae_type": self.config.sae.sae_type})
        artifact.add_dir(str(export_dir))
        self._run.log_artifact(artifact)
        self._artifact_logged = True

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        """Finish both loggers; `summary` (status, final losses, model path...) goes to the W&B run summary."""
        if self._closed:
            return
        self._closed = True
        fields = {"status": "finished", **self._summary, **_scrub(dict(summary or {}))}
        try:
            self.live.end()
        finally:
            if self._run is not None:
                self._run.summary.update(fields)
                self._run.finish(exit_code=0 if fields["status"] != "failed" else 1)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close({"status": "failed", "error": exc_type.__name__} if exc_type is not None else None)


def _scrub(values: Any) -> Any:
    """A JSON-friendly copy without secret-looking keys: the config and summary leave the machine."""
    if isinstance(values, Mapping):
        return {str(k): _scrub(v) for k, v in values.items() if not SECRET_KEY.search(str(k))}
    if isinstance(values, list | tuple):
        return [_scrub(v) for v in values]
    if values is None or isinstance(values, bool | int | float | str):
        return values
    if hasattr(values, "item") and getattr(values, "ndim", None) == 0:  # numpy / torch scalars
        return values.item()
    return str(values)  # Path and anything else: its text


def _redact(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text
