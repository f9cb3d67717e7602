"""Stage `evaluate` on the tiny model: its outputs, known answers, mismatch errors, and SAELens agreeing with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import identity_sae, with_section, write_params
from saepipe.activations.cache import ActivationCache
from saepipe.analysis.reconstruction import reconstruction_metrics
from saepipe.analysis.sparsity import sparsity_metrics
from saepipe.cli import main
from saepipe.corpus.tokens import read_token_cache
from saepipe.sae.formats import load_sae
from saepipe.stages import evaluate

HOOK_SPEC = "blocks.0.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the repo's model_name, recorded for the tiny model


@pytest.fixture(scope="module")
def pipeline(trained_pipeline):
    return trained_pipeline


def write_export(path: Path, sae, *, model_name: str = MODEL, hook: str = HOOK_SPEC) -> Path:
    """An SAE in saepipe's export layout (weights.pt + config.json), as `saepipe export` writes it."""
    path.mkdir(parents=True)
    torch.save(sae.export_tensors(), path / "weights.pt")
    config = {"format": "saepipe.sae", "format_version": 2, **sae.cfg.to_dict(), "model_name": model_name,
              "hook": hook}
    (path / "config.json").write_text(json.dumps(config))
    return path




def validation_rows(params, outliers: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    with ActivationCache(Path(params.activations.output_dir) / "activations.h5") as cache:
        flags = cache.column("validation", "outlier")
        x = cache.read("validation")
    return (x if outliers else x[torch.from_numpy(~flags)]), flags


def test_evaluate_writes_the_quick_analysis(pipeline, capsys) -> None:
    evaluate.run(pipeline)
    captured = capsys.readouterr()
    out = captured.out
    assert "hint" not in captured.err  # a pass of seconds: nothing to point at
    assert "CE loss recovered" in out and "FVU" in out and "dead" in out
    quick = Path(pipeline.evaluate.output_dir) / "default" / "quick"
    assert sorted(p.name for p in quick.iterdir()) == sorted(
        ["headline.json", "metrics.json", "feature_density.npy", "dead_features.json", "density_histogram.json",
         "density_histogram.png"])
    metrics = json.loads((quick / "metrics.json").read_text())
    assert {"evaluated", "sparsity", "reconstruction", "ablation", "formulas", "timing"} <= set(metrics)
    assert "mean(x)" in metrics["formulas"]["fvu"] and "ce_zero" in metrics["formulas"]["ablation_ce_loss_recovered"]
    assert metrics["evaluated"]["hook"] == HOOK_SPEC and metrics["evaluated"]["split"] == "validation"

    # the figures are those of the core functions on the same rows
    sae = load_sae(Path(pipeline.export.output_dir) / "default")
    x, flags = validation_rows(pipeline)
    rc, sp = metrics["reconstruction"], metrics["sparsity"]
    direct = reconstruction_metrics(sae, x)
    assert {k: rc[k] for k in direct} == pytest.approx(direct, rel=1e-6)
    assert rc["outlier_rows"] == int(flags.sum())
    sparsity = sparsity_metrics(sae, x)
    assert {k: sp[k] for k in sparsity.figures()} == pytest.approx(sparsity.figures())

    density = np.load(quick / "feature_density.npy")
    np.testing.assert_allclose(density, sparsity.density)
    dead = json.loads((quick / "dead_features.json").read_text())
    assert dead["ids"] == np.flatnonzero(density == 0).tolist() and dead["count"] == sp["dead_features"]
    histogram = json.loads((quick / "density_histogram.json").read_text())
    assert sum(r["features"] for r in histogram) == sae.d_sae - dead["count"]
    assert {"log10_density", "features"} <= set(histogram[0])
    assert (quick / "density_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ab = metrics["ablation"]
    assert 0 < ab["tokens"] <= 200
    assert ab["kl_sae_with_error"] < 1e-6 and ab["ce_sae_with_error"] == pytest.approx(ab["ce_clean"], abs=1e-5)
    assert ab["kl_sae"] > 0 and ab["kl_zero"] > 0
    want = (ab["ce_zero"] - ab["ce_sae"]) / (ab["ce_zero"] - ab["ce_clean"])
    assert ab["ce_loss_recovered"] == pytest.approx(want)

    # the flat DVC metrics file: one level, the figures above under short names
    headline = json.loads((quick / "headline.json").read_text())
    assert headline == {"fvu": rc["fvu"], "l0": sp["l0_mean"], "dead_pct": sp["dead_feature_percentage"],
                        "ce_recovered": ab["ce_loss_recovered"], "kl": ab["kl_sae"]}


def test_identity_sae_through_the_stage(pipeline, tmp_path) -> None:
    path = write_export(tmp_path / "identity", identity_sae())
    params = with_section(pipeline, "evaluate", sae_path=str(path), ablation_max_tokens=None)
    evaluate.run(params)
    metrics = json.loads((Path(params.evaluate.output_dir) / "identity" / "quick" / "metrics.json").read_text())
    assert metrics["reconstruction"]["fvu"] < 1e-10
    assert metrics["sparsity"]["l0_mean"] > 0
    ab = metrics["ablation"]
    assert ab["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert ab["kl_sae"] < 1e-7 and ab["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    x, _ = validation_rows(pipeline, outliers=True)
    assert ab["tokens"] > 200  # the whole split: more than the default cap above
    assert ab["tokens"] <= len(x)


def test_ablation_can_be_skipped_without_a_model(pipeline, tmp_path) -> None:
    params = with_section(pipeline, "evaluate", ablation_max_tokens=0, output_dir=str(tmp_path / "analysis"),
                          max_tokens=40)
    params = with_section(params, "base_model", output_dir=str(tmp_path / "no-model"))
    evaluate.run(params)
    metrics = json.loads((tmp_path / "analysis" / "default" / "quick" / "metrics.json").read_text())
    assert "ablation" not in metrics
    assert metrics["sparsity"]["tokens"] <= 40


def test_mismatches_exit_2_with_one_line(pipeline, make_tiny_model_dir, tmp_path, capsys) -> None:
    path = write_params(pipeline, tmp_path / "params.yaml")
    cases = [
        (write_export(tmp_path / "layer1", identity_sae(), hook="blocks.1.hook_resid_post"),
         f"was trained on blocks.1.hook_resid_post, not {HOOK_SPEC} (the activation cache"),
        (write_export(tmp_path / "narrow", identity_sae(32)), "takes 32-dimensional activations"),
        (write_export(tmp_path / "other", identity_sae(), model_name="other/model"),
         f"was trained on model other/model, not {MODEL}"),
        (tmp_path / "missing", "SAE not found"),
    ]
    for sae_dir, message in cases:
        assert main(["evaluate", "--params", path, "--sae-path", str(sae_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["evaluate", "--params", path, "--batch-size", "0"]) == 2
    assert "evaluate.batch_size=0: expected an integer >= 1" in capsys.readouterr().err

    # the model must have the cache's hook and width, too
    wide = tmp_path / "narrow_model"
    make_tiny_model_dir(wide, d_model=32)
    capsys.readouterr()  # its save progress bar
    other = with_section(pipeline, "base_model", output_dir=str(wide))
    assert main(["evaluate", "--params", write_params(other, tmp_path / "p2.yaml")]) == 2
    err = capsys.readouterr().err
    assert "d_model is 32" in err and err.count("\n") == 1


def test_saelens_computes_the_same_l0_and_reconstruction(pipeline) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    path = Path(pipeline.export.output_dir) / "default"
    theirs = sae_lens.SAE.load_from_disk(str(path))
    ours = load_sae(path)
    x, _ = validation_rows(pipeline)
    with torch.no_grad():
        features = theirs.encode(x)
        x_hat = theirs.decode(features)
    l0 = (features > 0).sum(-1).double()
    x64, x_hat64 = x.double(), x_hat.double()
    fvu = float((x64 - x_hat64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    mse = float((x64 - x_hat64).pow(2).mean())
    ours_sparsity = sparsity_metrics(ours, x)
    ours_reconstruction = reconstruction_metrics(ours, x)
    assert ours_sparsity.l0_mean == pytest.approx(float(l0.mean()), abs=1e-9)
    assert ours_sparsity.l0_median == pytest.approx(float(np.median(l0.numpy())))
    assert ours_sparsity.density == pytest.approx((features > 0).double().mean(0).numpy())
    assert ours_reconstruction["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert ours_reconstruction["mse"] == pytest.approx(mse, rel=1e-5)


def test_ablation_scores_only_the_documents_of_the_evaluated_rows(pipeline, tmp_path) -> None:
    with ActivationCache(Path(pipeline.activations.output_dir) / "activations.h5") as cache:
        doc_ids = cache.column("validation", "doc_ids")
    first = int(np.flatnonzero(doc_ids != doc_ids[0])[0])  # rows of the first cached document only
    params = with_section(pipeline, "evaluate", max_tokens=first, ablation_max_tokens=None,
                          output_dir=str(tmp_path / "analysis"))
    evaluate.run(params)
    metrics = json.loads((tmp_path / "analysis" / "default" / "quick" / "metrics.json").read_text())
    assert metrics["evaluated"]["documents"] == 1 and metrics["sparsity"]["tokens"] <= first
    assert metrics["ablation"]["documents"] == 1
    doc_length = int(read_token_cache(pipeline.tokenize.output).lengths()[doc_ids[0]])
    assert 0 < metrics["ablation"]["tokens"] < doc_length  # that document's predictions, not the whole split's


def test_a_long_ablation_pass_gets_a_one_line_hint(pipeline, tmp_path, monkeypatch, capsys) -> None:
    """Estimated from the first batch's speed, before the rest of the pass: the predictions, the time, the param."""
    monkeypatch.setattr(evaluate, "HINT_SECONDS", 0.0)
    evaluate.run(with_section(pipeline, "evaluate", output_dir=str(tmp_path / "analysis"), ablation_max_tokens=300))
    hints = [line for line in capsys.readouterr().err.splitlines() if "hint" in line]
    metrics = json.loads((tmp_path / "analysis" / "default" / "quick" / "metrics.json").read_text())
    tokens = metrics["ablation"]["tokens"]
    assert len(hints) == 1
    assert f"scores {tokens:,} predictions, about " in hints[0]
    assert "lower evaluate.ablation_max_tokens (now 300;" in hints[0]


def test_the_hint_names_the_size_the_estimate_and_the_param() -> None:
    assert evaluate.ablation_hint(16_384, evaluate.HINT_SECONDS - 1, 16_384) is None
    line = evaluate.ablation_hint(123_456, 1045.0, None)
    assert line is not None and "\n" not in line
    assert "123,456 predictions" in line and "about 17 min" in line and "evaluate.ablation_max_tokens (now null" in line
