"""dvc.yaml's `params:` match what each stage reads, recorded while every stage runs on a tiny pipeline.

A stage that reads a key dvc.yaml does not list would not rerun when that key changes (a stale result that
looks current); one that lists a key it never reads reruns for nothing. The record is taken at the lowest
level: every section's dataclass (and train's groups) logs each field read while the stage's `run(params)`
executes, after the params are loaded and validated, so helpers, properties and `flat_values` all count.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

from saepipe.cli import STAGES
from saepipe.config import SECTIONS, flat_fields, load_params
from saepipe.config.fields import is_group

DVC_ORDER = ["process", "base-model", "tokenize", "activations", "train", "export", "evaluate", "activation-db",
             "matrices", "summarize", "interp", "report"]
PATH_KINDS = ("deps", "outs", "metrics", "plots")
# Branches the first pass does not take, run again so that what they read is recorded too (overrides of the
# stage's own section, from the first pass's params).
SECOND_PASS = {
    "train": lambda params: {"use_end_to_end": True, "end_to_end_windows": 1},  # reads the model and token cache
    "interp": lambda params: {"explainer_model": params.base_model.output_dir},  # an LLM reads the summaries' sizes
}


def label_documents(params) -> None:
    """Give the tiny corpus (read from process.data_path, hence unlabelled) subjects and chapters, so that interp
    runs its probes, and reads what they read, rather than skipping them."""
    labels = Path(params.process.output_dir) / "labels.json"
    n = len(json.loads(labels.read_text()))
    labels.write_text(json.dumps([{"subject": f"s{i % 2}", "chapter": f"s{i % 2}_c{i % 4}"} for i in range(n)]))


def section_classes() -> dict[type, tuple[str, set[str]]]:
    """Every dataclass that holds params keys -> (its section, the flat keys it holds directly)."""
    out: dict[type, tuple[str, set[str]]] = {}

    def visit(cls: type, section: str) -> None:
        hints = typing.get_type_hints(cls)
        keys = {f.name for f in dataclasses.fields(cls) if not is_group(hints[f.name])}
        out[cls] = (section, keys)
        for f in dataclasses.fields(cls):
            if is_group(hints[f.name]):
                visit(hints[f.name], section)

    for section, cls in SECTIONS.items():
        visit(cls, section)
    return out


class Recorder:
    """Patches `__getattribute__` of every params dataclass; `reads` collects `section.key` while `on`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.reads: set[str] = set()
        for cls, (section, keys) in section_classes().items():
            monkeypatch.setattr(cls, "__getattribute__", self._getter(section, keys), raising=False)

    def _getter(self, section: str, keys: set[str]):
        recorder = self

        def getattribute(obj, name):
            if recorder.on and name in keys:
                recorder.reads.add(f"{section}.{name}")
            return object.__getattribute__(obj, name)

        return getattribute


def declared_params(repo_dir: Path) -> dict[str, tuple[list[str], set[str]]]:
    """Per stage: its `params:` list, and the keys its paths interpolate (`${tokenize.output}`): changing one of
    those changes the stage's paths, so DVC reruns it without the key being listed."""
    stages = yaml.safe_load((repo_dir / "dvc.yaml").read_text())["stages"]
    return {name: (list(stage.get("params", [])),
                   set(re.findall(r"\$\{([a-z_]+\.[a-z_]+)\}", json.dumps([stage.get(k) for k in PATH_KINDS]))))
            for name, stage in stages.items()}


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, repo_dir, tiny_model_dir, tiny_documents) -> Path:
    """params.yaml for the whole pipeline in tmp_path (the working directory), on the tiny model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.json").write_text(json.dumps(tiny_documents))
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    params["process"].update(data_path="docs.json", min_words=1)
    params["base_model"].update(source="local", local_path=str(tiny_model_dir), model_name="tiny-random-llama")
    params["tokenize"]["val_fraction"] = 0.25
    params["activations"].update(max_text_length=32, device="cpu", hook_layer=1)
    params["train"].update(sae_expansion=2, topk=4, topk_aux=8, batch_size=64, num_epochs=1, lr_warmup_steps=2,
                           device="cpu")
    params["evaluate"].update(ablation_max_tokens=64, batch_size=256, device="cpu")
    params["activation_db"].update(device="cpu")
    params["summarize"].update(top_k=3)
    params["interp"].update(features=2, score_examples=2, explain_examples=3, max_new_tokens=4, batch_size=4,
                            device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_each_stage_reads_exactly_the_params_dvc_yaml_lists(tiny_project, repo_dir, monkeypatch, capsys) -> None:
    declared = declared_params(repo_dir)
    assert sorted(declared) == sorted(DVC_ORDER)
    recorder = Recorder(monkeypatch)
    problems = []
    for stage in DVC_ORDER:
        spec = STAGES[stage]
        module = importlib.import_module(spec.module)
        recorder.reads = set()
        first = load_params("params.yaml")
        for overrides in ({}, *([SECOND_PASS[stage](first)] if stage in SECOND_PASS else [])):
            params = load_params("params.yaml", {spec.section: overrides})
            if stage == "interp":
                label_documents(params)
            recorder.on = True
            try:
                module.run(params)
            finally:
                recorder.on = False
        listed, in_paths = declared[stage]
        # no stage depends on a whole section but its own (and never on the whole file)
        whole = [d for d in listed if "." not in d]
        if whole != [spec.section]:
            problems.append(f"{stage}: whole sections {whole}, expected only its own [{spec.section!r}]")
        missing = sorted(k for k in recorder.reads if not covered(k, listed) and k not in in_paths)
        if missing:
            problems.append(f"{stage} reads params dvc.yaml does not list: {', '.join(missing)}")
        unread = sorted(d for d in listed if "." in d and d not in recorder.reads)
        if unread:
            problems.append(f"{stage}: dvc.yaml lists params the stage never reads: {', '.join(unread)}")
        twice = sorted(set(listed) & in_paths)
        if twice:
            problems.append(f"{stage}: dvc.yaml lists params its paths already interpolate: {', '.join(twice)}")
        own = {f"{spec.section}.{f.name}" for f in flat_fields(SECTIONS[spec.section])}
        assert recorder.reads, f"{stage}: recorded no reads at all (is the recorder patched in?)"
        assert recorder.reads & own, f"{stage} read nothing of its own section"
    capsys.readouterr()
    assert not problems, "dvc.yaml params do not match what the stages read:\n" + "\n".join(problems)


def test_the_recorder_sees_reads_through_groups_and_helpers(monkeypatch, repo_dir) -> None:
    """The instrument itself: a group field (train.sae.topk), a property and flat_values all record."""
    from saepipe.config import flat_values

    params = load_params(repo_dir / "params.yaml")
    recorder = Recorder(monkeypatch)
    recorder.on = True
    assert params.train.sae.topk > 0
    assert params.train.tracking.enabled is False  # a property: `wandb and wandb_mode != "disabled"`
    params.activations.overlap()
    assert {"train.topk", "train.wandb", "activations.max_text_length",
            "activations.context_overlap"} <= recorder.reads
    assert "train.lr" not in recorder.reads and "train.wandb_mode" not in recorder.reads  # short-circuited
    flat_values(params.train)
    assert {f"train.{f.name}" for f in flat_fields(SECTIONS["train"])} <= recorder.reads
