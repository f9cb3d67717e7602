"""Named runs: each run's outputs live in its own folders, so an ad-hoc run never overwrites another's.

Runs go through the CLI in-process with params files, as a user types them, on the tiny model's caches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from saepipe.activations.run_name import derived_run_name, with_run_name
from saepipe.cli import main
from saepipe.config import load_params
from saepipe.paths import checkpoints_dir, live_dir, run_name
from saepipe.stages import activations, tokenize

MODEL_SLUG = "smollm2-135m-instruct"  # the repo's base_model.model_name, as the activation cache records it


@pytest.fixture
def project(tiny_params, tmp_path) -> Path:
    """tmp_path (the working directory) with a params.yaml whose caches exist; train/export/evaluate to run."""
    tokenize.run(tiny_params)
    activations.run(tiny_params)
    params = tiny_params.to_dict()
    params["train"].update(sae_expansion=2, topk=4, topk_aux=8, batch_size=64, num_epochs=1, lr_warmup_steps=2,
                           device="cpu")
    params["evaluate"].update(ablation_max_tokens=0, device="cpu", batch_size=256)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_stages(*argv: str) -> None:
    for stage in ("train", "export", "evaluate"):
        assert main([stage, *argv]) == 0, stage


def test_ad_hoc_runs_with_another_params_file_leave_the_pipeline_run_untouched(project, capsys) -> None:
    run_stages()
    assert (project / "models/runs/default/live/metrics.json").is_file()
    assert (project / "analysis/default/quick/headline.json").is_file()
    before = snapshot(project)

    for k in (2, 3):  # two ad-hoc runs that differ only in k, names derived (run_name: null)
        (project / f"k{k}.yaml").write_text(yaml.safe_dump({"train": {"run_name": None, "topk": k}}))
        run_stages("--params", f"k{k}.yaml")
    out = capsys.readouterr().out

    after = snapshot(project)
    assert {path: after[path] for path in before} == before  # not one byte of the first run changed
    names = [f"{MODEL_SLUG}.L0.resid_post.batch_topk.x2.k{k}" for k in (2, 3)]
    for name, k in zip(names, (2, 3), strict=True):
        assert f"-> models/runs/{name} [" in out  # train's summary line names the run's folder
        live = json.loads((project / "models/runs" / name / "live/metrics.json").read_text())
        state = json.loads((project / "models/runs" / name / "checkpoints/best_model.pt/state.json").read_text())
        assert live["step"] == state["step"] and "fvu" in live["val"]  # dvclive's x axis: the training step
        assert (project / "models/runs" / name / "checkpoints/best_model.pt").is_dir()
        exported = json.loads((project / "models/sae" / name / "config.json").read_text())
        assert exported["run_name"] == name and exported["training"]["topk"] == k
        quick = json.loads((project / "analysis" / name / "quick/metrics.json").read_text())
        assert quick["evaluated"]["sae_path"] == str(Path("models/sae") / name)
    assert not (project / "dvclive").exists()


def test_run_names_are_derived_from_the_cache_and_the_sae(project) -> None:
    params = load_params("params.yaml")
    assert run_name(params) == "default"  # an explicit name wins
    assert checkpoints_dir(params) == Path("models/runs/default/checkpoints")
    assert live_dir(params) == Path("models/runs/default/live")

    def derived(**train) -> str:
        (project / "p.yaml").write_text(yaml.safe_dump({"train": {"run_name": None, **train}}))
        return run_name(with_run_name(load_params("p.yaml")))

    assert derived() == f"{MODEL_SLUG}.L0.resid_post.batch_topk.x2.k4"
    assert derived(sae_type="topk", sae_expansion=4, topk=8) == f"{MODEL_SLUG}.L0.resid_post.topk.x4.k8"
    # architectures without k are told apart by their sparsity penalty instead
    assert derived(sae_type="standard", sparsity_penalty=0.5) == f"{MODEL_SLUG}.L0.resid_post.standard.x2.s0.5"
    # the layer is the cache's, so a null hook_layer (the middle layer) still names a layer
    with_layer = load_params("params.yaml", {"train": {"run_name": None}, "activations": {"hook_layer": None}})
    assert derived_run_name(with_layer).startswith(f"{MODEL_SLUG}.L0.")


def test_null_run_name_is_refused_inside_dvc_and_without_a_cache(project, monkeypatch, capsys) -> None:
    (project / "p.yaml").write_text(yaml.safe_dump({"train": {"run_name": None}}))
    monkeypatch.setenv("DVC_STAGE", "train")  # what DVC sets for every stage command
    assert main(["train", "--params", "p.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saepipe train: error: train.run_name=None: expected a name inside a DVC stage")
    assert err.count("\n") == 1
    monkeypatch.delenv("DVC_STAGE")
    (project / "q.yaml").write_text(yaml.safe_dump({"train": {"run_name": None},
                                                    "activations": {"output_dir": "nowhere"}}))
    assert main(["export", "--params", "q.yaml"]) == 2
    assert "run `saepipe activations` first or set train.run_name" in capsys.readouterr().err
    assert not (project / "models").exists()
