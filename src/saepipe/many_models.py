"""One SAE per model: the models pipeline's list -> one complete params file per model, and DVC targets.

`pipelines/models/` is a DVC project of its own (so its stages stay out of the single pipeline's `dvc status`,
`dvc pull` and `dvc exp show`). Its dvc.yaml runs the single pipeline's own stages once per model (DVC
`foreach`), each as `saepipe <stage> --params pipelines/models/<params_dir>/<key>.yaml` from the project root;
nothing here trains or loads a model. This module reads the list (`pipelines/models/params.yaml`), builds each
model's params from three layers (the project's params.yaml, the list's `defaults`, the model's own entry) plus
the paths that keep models apart (`pipelines/models/<output_root>/<key>/...`, see LAYOUT), and turns a
selection of models into `dvc repro` targets of that project.

The generated file holds every key of every section, so DVC tracks exactly what each stage reads from it
and a change to the project's params.yaml reaches a model only through its regenerated file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from saepipe.config import SECTIONS, Params, flat_fields, params_from_dict
from saepipe.config.fields import did_you_mean
from saepipe.errors import UserError

MODELS_FILE = "pipelines/models/params.yaml"
FINAL_STAGE = "report"
"""The last stage per model in pipelines/models/dvc.yaml: reproducing it reproduces the model's whole chain."""

# Model K's outputs, under <pipeline dir>/<output_root>/<K>/ (its dvc.yaml spells the same paths; a test checks).
LAYOUT: dict[tuple[str, str], str] = {
    ("base_model", "output_dir"): "base",
    ("tokenize", "output"): "tokens.h5",
    ("activations", "output_dir"): "activations",
    ("train", "output_dir"): "runs",  # runs/<run_name>/{checkpoints,live}
    ("export", "output_dir"): "sae",
    ("evaluate", "output_dir"): "analysis",
}
# The corpus every model shares, made once by the pipeline's own `process` stage: <pipeline dir>/data/processed.
CORPUS = "data/processed"
# The family's comparison, made once after every model's report by the `compare` stage: <pipeline dir>/compare.
FAMILY = "compare"
# Set by the pipeline, never by a model: paths its dvc.yaml declares, and the shared corpus.
FIXED = {*LAYOUT, ("train", "run_name"), ("evaluate", "sae_path"), ("compare", "output_dir")}
SHARED_SECTIONS = ("process",)
TOP_LEVEL = ("output_root", "params_dir", "run_name", "defaults", "models")
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")

Overrides = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ModelsFile:
    """The models pipeline's list, checked: where outputs go and what each model changes."""

    path: str
    """The file it was read from (named in every error)."""
    output_root: str
    """Model K's outputs go to <output_root>/<K>/ (base, tokens.h5, activations, runs, sae, analysis),
    relative to the list's folder."""
    params_dir: str
    """Model K's generated params file is <params_dir>/<K>.yaml, relative to the list's folder."""
    run_name: str
    """train.run_name of every model's SAE (its folders are already per model)."""
    defaults: Overrides
    """Values every model takes over the project's params.yaml, by section."""
    models: dict[str, Overrides]
    """Model key -> its own values over the defaults, by section (base_model, activations memory settings...)."""

    @property
    def pipeline_dir(self) -> PurePosixPath:
        """The models pipeline's DVC project: the list's folder (saepipe itself runs from the project root)."""
        return PurePosixPath(Path(self.path).parent.as_posix())

    def params_file(self, key: str) -> PurePosixPath:
        return self.pipeline_dir / self.params_dir / f"{key}.yaml"

    def output_dir(self, key: str) -> PurePosixPath:
        return self.pipeline_dir / self.output_root / key


def _fail(path: str, where: str, message: str) -> UserError:
    return UserError(f"{path}: {where}: {message}")


def _check_overrides(path: str, where: str, layer: Any) -> Overrides:
    """A mapping section -> key -> value whose sections and keys saepipe knows and the pipeline leaves free."""
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        raise _fail(path, where, "expected a mapping of params sections")
    for section, values in layer.items():
        if section not in SECTIONS:
            hint = did_you_mean(str(section), list(SECTIONS))
            raise _fail(path, f"{where}.{section}", f"unknown section{hint} (sections: {', '.join(SECTIONS)})")
        if section in SHARED_SECTIONS:
            raise _fail(path, f"{where}.{section}", "the corpus is shared by every model; set it in params.yaml")
        if not isinstance(values, dict):
            raise _fail(path, f"{where}.{section}", "expected a mapping of keys to values")
        known = [f.name for f in flat_fields(SECTIONS[section])]
        for key in values:
            if key not in known:
                raise _fail(path, f"{where}.{section}.{key}", f"unknown key{did_you_mean(str(key), known)}")
            if (section, key) in FIXED:
                raise _fail(path, f"{where}.{section}.{key}",
                            "set by the models pipeline (outputs go under output_root/<key>/, the run is run_name)")
    return {section: dict(values) for section, values in layer.items()}


def _path_value(path: str, raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise _fail(path, name, f"{value!r}: expected a relative path inside the project")
    return value


def read_models_file(path: str | Path = MODELS_FILE) -> ModelsFile:
    """Load and check the models list; every problem is one line naming the file and the field."""
    path = str(path)
    if not Path(path).is_file():
        raise UserError(f"models file not found: {path} (run from the project root or pass --models-file)")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(TOP_LEVEL)}")
    for name in raw:
        if name not in TOP_LEVEL:
            raise _fail(path, str(name), f"unknown key{did_you_mean(str(name), list(TOP_LEVEL))}")
    for name in TOP_LEVEL:
        if name not in raw:
            raise _fail(path, name, "missing")
    run_name = raw["run_name"]
    if not isinstance(run_name, str) or not KEY_PATTERN.fullmatch(run_name):
        raise _fail(path, "run_name", f"{run_name!r}: expected a folder name (a-z, 0-9, '.', '_', '-')")
    models = raw["models"]
    if not isinstance(models, dict) or not models:
        raise _fail(path, "models", "expected a non-empty mapping of model key -> its settings")
    checked = {}
    for key, entry in models.items():
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise _fail(path, f"models.{key}", "expected a key of a-z, 0-9, '.', '_', '-' (it names folders and "
                        "DVC stages)")
        checked[key] = _check_overrides(path, f"models.{key}", entry)
    return ModelsFile(path=path, output_root=_path_value(path, raw, "output_root"),
                      params_dir=_path_value(path, raw, "params_dir"), run_name=run_name,
                      defaults=_check_overrides(path, "defaults", raw["defaults"]), models=checked)


def select(spec: ModelsFile, selection: str | None, flag: str = "--select") -> list[str]:
    """The model keys named in a comma-separated `selection` (all of them, in file order, when None)."""
    if selection is None:
        return list(spec.models)
    keys = [key.strip() for key in selection.split(",") if key.strip()]
    if not keys:
        raise UserError(f"{flag}: expected model keys separated by commas")
    for key in keys:
        if key not in spec.models:
            raise UserError(f"{flag}: unknown model {key!r}{did_you_mean(key, list(spec.models))} "
                            f"(models in {spec.path}: {', '.join(spec.models)})")
    return list(dict.fromkeys(keys))


def model_params(spec: ModelsFile, key: str, project: dict[str, Any]) -> Params:
    """Model `key`'s complete params: the project's, then the defaults, then its entry, then its paths."""
    raw: dict[str, dict[str, Any]] = {name: dict(values) for name, values in project.items()}
    for layer in (spec.defaults, spec.models[key]):
        for section, values in layer.items():
            raw.setdefault(section, {}).update(values)
    for (section, name), relative in LAYOUT.items():
        raw.setdefault(section, {})[name] = str(spec.output_dir(key) / relative)
    raw["process"]["output_dir"] = str(spec.pipeline_dir / CORPUS)
    raw.setdefault("compare", {})["output_dir"] = str(spec.pipeline_dir / FAMILY)
    raw["train"]["run_name"] = spec.run_name
    raw["evaluate"]["sae_path"] = None
    try:
        return params_from_dict(raw)
    except UserError as exc:
        raise UserError(f"{spec.path}: model {key!r}: {exc}") from None


def params_text(params: Params, key: str, spec: ModelsFile) -> str:
    header = (f"# Generated by `saepipe models --configure {key}` from params.yaml and {spec.path}; do not edit.\n"
              f"# Model {key}'s complete params: every stage of {Path(spec.path).parent}/dvc.yaml reads it.\n")
    return header + yaml.safe_dump(params.to_dict(), sort_keys=False)


def repro_targets(keys: list[str]) -> list[str]:
    """`dvc repro` targets, inside the pipeline's folder, that reproduce exactly these models (each one's last
    stage, hence its chain)."""
    return [f"{FINAL_STAGE}@{key}" for key in keys]
