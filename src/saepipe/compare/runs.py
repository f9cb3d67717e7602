"""The finished runs a comparison reads: workspace runs, DVC experiments, and the models pipeline's models.

Nothing is recomputed. A run's figures are the files its stages wrote (evaluate's headline.json, interp's
probing.json and autointerp.json); its params the ones it ran with (a DVC experiment's or a model's params file,
flattened to `section.key`; for a workspace run, its export's `training` record plus its model and hook); its
SAE and activation DB the stages' outputs, read from the workspace or, for an experiment, from the DVC cache at
the experiment's revision (never by changing the workspace).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from saepipe import paths
from saepipe.compare.table import AUTOINTERP, HEADLINE, PROBING
from saepipe.errors import UserError


@dataclass(frozen=True)
class Artifact:
    """A stage output of a run: a workspace path, or a path at a DVC experiment's revision."""

    path: str
    rev: str | None = None

    def local(self, scratch: Path) -> Path:
        """A local copy to read: the workspace path itself, or the experiment's files fetched into `scratch`."""
        if self.rev is None:
            return Path(self.path)
        from dvc.api import DVCFileSystem

        target = scratch / self.rev[:12] / self.path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                DVCFileSystem(".", rev=self.rev).get(self.path, str(target), recursive=True)
            except Exception as exc:  # missing from the cache (pulled elsewhere), or not a DVC output
                raise UserError(f"{self.path} at experiment revision {self.rev[:7]} is not in the DVC cache "
                                f"({type(exc).__name__}); `dvc exp pull` it or compare workspace runs") from None
        return target


@dataclass(frozen=True)
class Run:
    name: str
    source: str
    """workspace, experiment or models."""
    params: dict[str, Any]
    metrics: dict[str, float | None]
    sae: Artifact
    activation_db: Artifact | None = None
    dead: list[int] | None = field(default=None, compare=False)
    """Evaluate's dead latent ids, where the run has them in the workspace."""

    @property
    def architecture(self) -> str:
        return str(self.params.get("train.sae_type", "?"))


def flatten(sections: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in sections.items() if isinstance(values, dict) for k, v in values.items()}


def figures(headline: dict[str, Any], probing: dict[str, Any] | None, autointerp: dict[str, Any] | None
            ) -> dict[str, float | None]:
    """The figures a row shows, from the three metric files (probing and auto-interp where interp ran)."""
    out = {k: _number(headline.get(k)) for k in HEADLINE}
    out.update({k: _number((probing or {}).get(k)) for k in PROBING})
    out.update({k: _number((autointerp or {}).get(k)) for k in AUTOINTERP})
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _json(path: Path, parse: Any = json.loads) -> dict[str, Any] | None:
    """The mapping a JSON (or, with `parse=yaml.safe_load`, YAML) file holds; None if absent or not one."""
    try:
        value = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def analysis_run(name: str, source: str, analysis: Path, params: dict[str, Any] | None = None) -> Run | None:
    """The run whose analyses are in `analysis` (`<evaluate.output_dir>/<run>/`), if evaluate finished there."""
    headline = _json(analysis / paths.QUICK / paths.QUICK_HEADLINE)
    metrics = _json(analysis / paths.QUICK / paths.QUICK_METRICS)
    if headline is None or metrics is None:
        return None
    sae = Path(str((metrics.get("evaluated") or {}).get("sae_path", "")))
    config = _json(sae / paths.EXPORT_CONFIG) or {}
    if params is None:
        params = {**{f"train.{k}": v for k, v in (config.get("training") or {}).items()},
                  "base_model.model_name": config.get("model_name")}
    params = {**params, "activations.hook": config.get("hook")}  # the hook resolved (a null layer: the middle)
    dead = _json(analysis / paths.QUICK / paths.QUICK_DEAD)
    db = analysis / paths.ACTIVATION_DB
    interp = analysis / paths.INTERP
    return Run(name=name, source=source, params=params,
               metrics=figures(headline, _json(interp / paths.PROBING), _json(interp / paths.AUTOINTERP)),
               sae=Artifact(str(sae)), activation_db=Artifact(str(db)) if db.is_file() else None,
               dead=[int(i) for i in dead.get("ids", [])] if dead and isinstance(dead.get("ids"), list) else None)


def workspace_runs(analysis_root: str | Path) -> list[Run]:
    """Every folder of `evaluate.output_dir` that evaluate finished (its `compare` output aside)."""
    root = Path(analysis_root)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        run = analysis_run(folder.name, "workspace", folder)
        if run is not None:
            found.append(run)
    return found


def exp_show(repo: str | Path = ".") -> list[dict[str, Any]]:
    """`dvc exp show --json` for every commit experiments were run from ([] outside a DVC project or without
    experiments). Plain `exp show` sees only those of HEAD: a commit after a sweep would hide it. `dvc exp list
    --all-commits` names the baselines in a fraction of a second; `exp show --all-commits` reads every commit."""
    if not (Path(repo) / ".dvc").is_dir():
        return []
    listed = _dvc(["exp", "list", "--all-commits"], repo)  # "<baseline>:" then one indented line per experiment
    baselines = [line[:-1] for line in listed.splitlines() if line.endswith(":") and not line.startswith("\t")]
    if not baselines:
        return []
    return json.loads(_dvc(["exp", "show", "--json", *[f"--rev={rev}" for rev in baselines]], repo) or "[]")


def _dvc(args: list[str], repo: str | Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`dvc {' '.join(args[:2])}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout


def experiment_runs(records: Iterable[dict[str, Any]]) -> list[Run]:
    """Finished experiments of `dvc exp show --json`: each one's params.yaml, its metrics files and its outputs
    (read from the DVC cache at its revision). Experiments without evaluate's headline figures (queued, running,
    failed) are skipped; figures an experiment inherited from its baseline are dropped (`_stale`)."""
    runs = []
    for baseline in records:
        base_outs = ((baseline.get("data") or {}).get("outs")) or {}
        for experiment in baseline.get("experiments") or []:
            revs = experiment.get("revs") or []
            if not revs or not revs[0].get("data") or revs[0].get("error"):
                continue
            rev = revs[0]
            data = rev["data"]
            params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
            run = _experiment_run(str(experiment.get("name") or rev.get("name") or rev["rev"][:7]), rev["rev"],
                                  params, data.get("metrics") or {}, data.get("outs") or {}, base_outs)
            if run is not None:
                runs.append(run)
    return runs


def _stale(witness: str, sae: str, outs: dict[str, Any], base_outs: dict[str, Any]) -> bool:
    """Whether an experiment's output `witness` is its baseline's: the experiment changed the SAE but not this
    output of a stage that reads it (an experiment run up to an earlier stage keeps the later stages' files)."""
    def digest(table: dict[str, Any], path: str) -> Any:
        return (table.get(path) or {}).get("hash")

    changed_sae = digest(outs, sae) != digest(base_outs, sae)
    return changed_sae and digest(outs, witness) is not None and digest(outs, witness) == digest(base_outs, witness)


def _experiment_run(name: str, rev: str, params: dict[str, Any], metrics: dict[str, Any], outs: dict[str, Any],
                    base_outs: dict[str, Any]) -> Run | None:
    files = {PurePosixPath(path): (value or {}).get("data") or {} for path, value in metrics.items()}
    headline = next((p for p in files if p.name == paths.QUICK_HEADLINE and p.parent.name == paths.QUICK), None)
    if headline is None:
        return None
    analysis = headline.parent.parent
    interp = analysis / paths.INTERP
    sae = f"{params.get('export.output_dir')}/{params.get('train.run_name')}"
    if _stale(str(analysis / paths.QUICK / paths.QUICK_DENSITY), sae, outs, base_outs):
        return None  # evaluate did not run for this SAE
    fresh_interp = not _stale(str(interp / paths.PROBING_FEATURES), sae, outs, base_outs)
    db = str(analysis / paths.ACTIVATION_DB)
    figures_ = figures(files[headline], files.get(interp / paths.PROBING) if fresh_interp else None,
                       files.get(interp / paths.AUTOINTERP) if fresh_interp else None)
    if figures_["fvu"] is None:
        return None
    has_db = db in outs and not _stale(db, sae, outs, base_outs)
    return Run(name=name, source="experiment", params=params, metrics=figures_,
               sae=Artifact(sae, rev), activation_db=Artifact(db, rev) if has_db else None)


def models_runs(models_file: str | Path) -> list[Run]:
    """Each model of the models pipeline whose evaluate finished: named by its key, its params its generated
    params file's."""
    from saepipe.many_models import read_models_file

    if not Path(models_file).is_file():
        return []
    spec = read_models_file(models_file)
    runs = []
    for key in spec.models:
        raw = _json(Path(spec.params_file(key)), yaml.safe_load)
        run = analysis_run(key, "models", Path(spec.output_dir(key)) / "analysis" / spec.run_name,
                           flatten(raw) if raw else None)
        if run is not None:
            runs.append(run)
    return runs

