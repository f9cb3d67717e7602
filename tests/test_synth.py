"""Synthetic ground truth: the generator keeps its promises, the cache trains unchanged, the scorer gives
known answers (an easy setting is recovered, a random SAE scores chance, a permuted truth scores as the truth)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml

from saepipe.activations.cache import ActivationCache
from saepipe.cli import main
from saepipe.sae import build_sae, sae_config
from saepipe.synth.generate import SynthConfig, Truth, generator
from saepipe.synth.score import best_cosines, chance_mcc, score_sae
from saepipe.synth.store import TRUTH_JSON, TRUTH_TENSORS, read_truth, write_synthetic
from saepipe.training.data import load_activation_data

SMALL = SynthConfig(d_in=32, n_features=128, active_per_row=6.0, hierarchy=0.25, correlation=0.2, noise_std=0.05,
                    bias_norm=0.5, rows=4000, doc_rows=64, name="small")
EASY = SynthConfig(d_in=32, n_features=24, active_per_row=3.0, hierarchy=0.0, correlation=0.0, noise_std=0.0,
                   bias_norm=0.5, orthogonal=True, rows=24000, name="easy")


def draw(cfg: SynthConfig, rows: int, seed_stream: str = "train") -> tuple[Truth, torch.Tensor]:
    truth = Truth.build(cfg)
    return truth, torch.cat([codes for _, codes in truth.rows(seed_stream, rows)])


def test_generator_is_seeded_hits_the_active_count_and_keeps_zipf_marginals() -> None:
    truth, codes = draw(SMALL, 40_000)
    again, codes_again = draw(SMALL, 40_000)
    assert torch.equal(truth.dictionary, again.dictionary) and torch.equal(codes, codes_again)
    other, other_codes = draw(dataclasses.replace(SMALL, seed=1), 1000)
    assert not torch.equal(truth.dictionary, other.dictionary)
    assert not torch.equal(codes[:1000], other_codes)
    assert torch.allclose(truth.dictionary.norm(dim=1), torch.ones(SMALL.n_features), atol=1e-5)

    fires = codes > 0
    assert fires.sum(1).double().mean().item() == pytest.approx(SMALL.active_per_row, rel=0.03)
    p = truth.probabilities
    assert p.sum().item() == pytest.approx(SMALL.active_per_row, rel=1e-4)
    assert bool((p[:-1] >= p[1:]).all())  # Zipf: feature 0 the most frequent
    assert p[0] / p[-1] == pytest.approx(SMALL.n_features ** SMALL.zipf_exponent, rel=1e-3)
    rate = fires.double().mean(0)
    # hierarchy and correlation leave each feature's marginal firing rate at its Zipf probability
    assert (rate - p.double()).abs().max().item() < 0.02
    assert rate[:16].mean() > 2 * rate[-16:].mean()
    magnitudes = codes[fires]
    assert bool((magnitudes > 0).all()) and magnitudes.mean().item() == pytest.approx(1.0, abs=0.03)


def test_children_fire_only_where_their_parent_fires() -> None:
    cfg = dataclasses.replace(SMALL, hierarchy=0.5)
    truth, codes = draw(cfg, 20_000)
    child = torch.nonzero(truth.parents >= 0).squeeze(1)
    assert len(child) == 64
    parent = truth.parents[child]
    assert bool((parent < child).all()) and bool((truth.parents[parent] == -1).all())  # roots, more frequent
    fires = codes > 0
    assert not bool((fires[:, child] & ~fires[:, parent]).any())
    assert bool(fires[:, child].any(0).all())  # and they do fire


def test_correlation_makes_features_fire_together() -> None:
    independent = dataclasses.replace(SMALL, hierarchy=0.0, correlation=0.0)
    correlated = dataclasses.replace(independent, correlation=0.8)

    def spread(cfg):  # variance of the active count: shared factors make rows busy or quiet together
        return (draw(cfg, 20_000)[1] > 0).sum(1).double().var().item()

    assert spread(correlated) > 1.5 * spread(independent)


def test_cache_loads_unchanged_and_holds_the_truths_rows(tmp_path) -> None:
    summary = write_synthetic(SMALL, tmp_path / "s", progress=False)
    assert summary["rows"] == 4000 and summary["outliers"] == 0
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"activations.h5", TRUTH_TENSORS, TRUTH_JSON}
    truth = read_truth(tmp_path / "s")
    with ActivationCache(tmp_path / "s" / "activations.h5") as cache:
        assert cache.attrs["model_name"] == "synthetic/small" and cache.hook == "blocks.0.hook_synthetic"
        assert cache.attrs["tokenizer_fingerprint"] == f"synthetic:{truth.fingerprint()}"
        assert cache.n_rows("train") == 3800 and cache.n_rows("validation") == 200
        validation = cache.read("validation")
        assert not cache.column("train", "outlier").any()
        assert np.array_equal(cache.column("train", "doc_ids")[:130], np.arange(130) // 64)
    x, _ = next(truth.rows("validation", 200))
    assert torch.equal(validation, x)  # the scorer can regenerate any stream
    data = load_activation_data(tmp_path / "s" / "activations.h5", include_outliers=False, max_train_rows=None,
                                normalize=True)
    assert data.d_in == 32 and data.n_train == 3800 and sum(data.dropped_outliers.values()) == 0


def test_chance_mcc_matches_random_unit_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    for d_in, d_sae in ((32, 64), (256, 4096)):
        fixed = torch.randn(400, d_in, generator=gen)
        learned = torch.randn(d_sae, d_in, generator=gen)
        best, _ = best_cosines(fixed, learned)
        assert best.mean().item() == pytest.approx(chance_mcc(d_in, d_sae), abs=0.01)


def test_a_random_sae_scores_chance() -> None:
    torch.manual_seed(0)
    sae = build_sae(sae_config("topk", d_in=32, d_sae=64, k=6)).eval()
    result = score_sae(sae, Truth.build(SMALL), rows=4000).summary()
    assert result["mcc"] == pytest.approx(chance_mcc(32, 64), abs=0.03)
    assert result["recovered"] == 0.0
    assert result["f1"] < 0.3 and result["fvu"] > 0.5


def truth_sae(truth: Truth, order: torch.Tensor, extra: int = 0, scales: torch.Tensor | None = None):
    """A ReLU SAE whose latent r is true feature order[r] (decoder rows scaled by `scales`, the encoder by
    their inverse), plus `extra` random latents that never fire. A bias of -1e-4 keeps rounding noise
    (pre-activations of 1e-7 where the feature is absent) from counting as firing."""
    d = truth.config.d_in
    sae = build_sae(sae_config("standard", d_in=d, d_sae=len(order) + extra)).eval()
    scales = torch.ones(len(order)) if scales is None else scales
    with torch.no_grad():
        sae.W_dec[: len(order)] = truth.dictionary[order] * scales[:, None]
        sae.W_enc[:, : len(order)] = truth.dictionary[order].t() / scales
        sae.b_enc[: len(order)] = -1e-4 / scales
        sae.b_enc[len(order):] = -1e3
        sae.b_dec.copy_(truth.bias)
    return sae


def test_a_permuted_truth_scores_as_the_truth_and_the_matching_finds_the_permutation() -> None:
    truth = Truth.build(EASY)
    n = EASY.n_features
    exact = score_sae(truth_sae(truth, torch.arange(n)), truth, rows=4000)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    scales = torch.rand(n, generator=torch.Generator().manual_seed(4)) * 3 + 0.2  # norms must not matter
    permuted = score_sae(truth_sae(truth, perm, extra=40, scales=scales), truth, rows=4000)
    for result in (exact, permuted):
        m = result.summary()
        assert m["mcc"] == pytest.approx(1.0, abs=1e-5) and m["recovered"] == 1.0
        assert m["f1"] == pytest.approx(1.0) and m["shrinkage"] == pytest.approx(1.0, abs=1e-3)
        assert m["fvu"] < 1e-6 and m["l0"] == pytest.approx(EASY.active_per_row, rel=0.05)
    assert torch.equal(permuted.matched[perm], torch.arange(n))  # true feature perm[r] -> latent r
    assert torch.equal(exact.matched, torch.arange(n))


def test_halved_activations_read_as_shrinkage() -> None:
    truth = Truth.build(EASY)
    sae = truth_sae(truth, torch.arange(EASY.n_features))
    with torch.no_grad():
        sae.W_enc *= 0.5
        sae.b_enc *= 0.5
    assert score_sae(sae, truth, rows=2000).summary()["shrinkage"] == pytest.approx(0.5, abs=1e-3)


def test_topk_trained_by_the_pipeline_recovers_an_easy_setting(tmp_path, repo_dir, monkeypatch, capsys) -> None:
    """Generate, `saepipe train` and `export` on the cache unchanged, then `synth score`: >= 90% recovered."""
    monkeypatch.chdir(tmp_path)
    flags = ["--d-in", "32", "--n-features", "24", "--active-per-row", "3", "--hierarchy", "0", "--correlation",
             "0", "--noise-std", "0", "--bias-norm", "0.5", "--orthogonal", "--zipf-exponent", "0", "--rows", "16000",
             "--name", "easy"]
    assert main(["synth", "generate", "--out", "easy", "--no-progress", *flags]) == 0
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    params["activations"]["output_dir"] = "easy"
    params["train"].update(run_name="easy", sae_type="topk", sae_expansion=2, topk=4, topk_aux=16, batch_size=128,
                           num_epochs=3, lr=0.004, lr_warmup_steps=10, device="cpu", output_dir="runs",
                           log_freq=1000)
    params["export"].update(output_dir="sae")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--params", "p.yaml"]) == 0
    assert main(["export", "--params", "p.yaml"]) == 0
    assert main(["synth", "score", "--truth", "easy", "--sae", "sae/easy", "--rows", "4000", "--no-progress",
                 "--json", "score.json"]) == 0
    assert "synth score: easy: MCC" in capsys.readouterr().out
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["recovered"] >= 0.9, result
    assert result["mcc"] > 0.95 and result["fvu"] < 0.1 and result["f1"] > 0.8, result
    assert math.isfinite(result["shrinkage"])


def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys) -> None:
    assert main(["synth", "generate", "--out", str(tmp_path / "x"), "--orthogonal", "--n-features", "64",
                 "--d-in", "32"]) == 2
    assert "synth.orthogonal" in capsys.readouterr().err
    assert main(["synth", "generate", "--out", str(tmp_path / "x"), "--hierarchy", "1.5"]) == 2
    assert "synth.hierarchy=1.5" in capsys.readouterr().err
    assert main(["synth", "score", "--truth", str(tmp_path), "--sae", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--truth" in err
    assert not (tmp_path / "x").exists()


def test_a_truth_whose_tensors_changed_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from saepipe.errors import UserError

    write_synthetic(dataclasses.replace(SMALL, rows=300), tmp_path, progress=False)
    tensors = load_file(str(tmp_path / TRUTH_TENSORS))
    tensors["bias"] = tensors["bias"] + 1
    save_file(tensors, str(tmp_path / TRUTH_TENSORS))
    with pytest.raises(UserError, match="fingerprint"):
        read_truth(tmp_path)
    assert generator(0, "train").initial_seed() != generator(0, "validation").initial_seed()
