"""The analysis cores: every formula against a direct computation, and the ablation on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import identity_sae
from saepipe.analysis.ablation import (
    AblationAccumulator,
    ablation_metrics,
    ablation_plan,
    evaluate_ablation,
    replacements,
    scored_per_window,
)
from saepipe.analysis.quick import evaluate_activations
from saepipe.analysis.reconstruction import ReconstructionAccumulator, fvu, reconstruction_metrics
from saepipe.analysis.sparsity import (
    SparsityAccumulator,
    histogram_quantile,
    log10_density_histogram,
    mean_l0,
    sparsity_metrics,
)
from saepipe.corpus.tokens import TokenCache
from saepipe.model.hooks import HookSpec
from saepipe.model.splice import splice_hook
from saepipe.sae import build_sae, sae_config

D = 64
HOOK = HookSpec(0, "hook_resid_post")




def zero_sae(d: int = D):
    """Reconstructs everything as 0: the same as zero-ablating the hook."""
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_sae(d: int = D, k: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return build_sae(sae_config("topk", d_in=d, d_sae=4 * d, k=k)).eval()


def batches(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == len(x)
    return list(torch.split(x, sizes))


# ---- sparsity ------------------------------------------------------------------------------------------------
def test_sparsity_accumulator_matches_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d_sae = 997, 40
    rates = torch.linspace(0.002, 0.5, d_sae)
    rates[[3, 17]] = 0.0  # never fire: dead
    rates[5] = 0.9
    fires = torch.rand(n, d_sae, generator=gen) < rates
    features = fires * torch.rand(n, d_sae, generator=gen).add(0.1)
    acc = SparsityAccumulator(d_sae)
    for part in batches(features, [1, 500, 13, 483]):
        acc.add(part)
    result = acc.result()

    l0 = fires.sum(1).numpy()
    density = fires.double().mean(0).numpy()
    figures = result.figures()
    assert figures["tokens"] == n
    assert figures["l0_mean"] == pytest.approx(l0.mean(), rel=1e-12)
    assert figures["l0_median"] == pytest.approx(np.median(l0))
    assert figures["l0_p90"] == pytest.approx(np.percentile(l0, 90))
    np.testing.assert_allclose(result.density, density, rtol=1e-12)
    assert result.dead_ids.tolist() == [3, 17] == np.flatnonzero(density == 0).tolist()
    assert figures["dead_features"] == 2 and figures["dead_feature_percentage"] == pytest.approx(5.0)
    assert figures["alive_fraction"] == pytest.approx(38 / 40)
    assert figures["features_firing_over_1pct"] == int((density > 0.01).sum())
    assert figures["features_firing_over_10pct"] == int((density > 0.1).sum())
    assert figures["l0_fraction"] == pytest.approx(l0.mean() / d_sae)


@pytest.mark.parametrize("values", [[3], [0, 0, 1], [5, 1, 4, 4, 2, 9, 0], list(range(11)) * 3 + [7]])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_histogram_quantile_is_numpys(values, q) -> None:
    counts = np.bincount(values, minlength=12)
    assert histogram_quantile(counts, q) == pytest.approx(np.quantile(values, q))


def test_log10_density_histogram() -> None:
    tokens = 1000
    density = np.array([0, 0, 1 / tokens, 0.0015, 0.01, 0.02, 0.5, 1.0, 0.3, 0.003])
    hist = log10_density_histogram(density, tokens)
    assert hist.dead == 2 and hist.counts.sum() == 8
    assert hist.edges[0] <= -3 and hist.edges[-1] == 0.0
    np.testing.assert_allclose(np.diff(hist.edges), 0.25)
    expected, _ = np.histogram(np.log10(density[density > 0]), bins=hist.edges)
    assert hist.counts.tolist() == expected.tolist()
    rows = hist.rows()
    assert len(rows) == len(hist.counts) and sum(r["features"] for r in rows) == 8
    assert rows[-1]["bin_high"] == 0.0 and rows[-1]["features"] >= 1  # density 1 lands in the last bin


# ---- reconstruction ------------------------------------------------------------------------------------------
def direct_reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    x, x_hat = x.double(), x_hat.double()
    error = (x - x_hat).pow(2).sum()
    variance = (x - x.mean(0)).pow(2).sum()
    return {
        "mse": float(error / x.numel()),
        "fvu": float(error / variance),
        "cos_sim": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean()),
        "l2_ratio": float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()),
        "relative_reconstruction_bias": float(x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()),
    }


def test_reconstruction_accumulator_matches_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    # a large shared offset, as residual streams have: the streamed total variance must not cancel
    x = 300.0 + torch.randn(1001, 24, generator=gen)
    x_hat = 0.9 * x + 0.2 * torch.randn(1001, 24, generator=gen)
    acc = ReconstructionAccumulator()
    for xs, hs in zip(batches(x, [7, 600, 394]), batches(x_hat, [7, 600, 394]), strict=True):
        acc.add(xs, hs)
    got = acc.result()
    want = direct_reconstruction(x, x_hat)
    assert got["tokens"] == 1001
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9), name
    assert got["explained_variance"] == pytest.approx(1 - want["fvu"], rel=1e-9)


def test_one_call_api_on_a_loaded_sae() -> None:
    sae = random_sae()
    x = 3 * torch.randn(200, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    l0 = (f > 0).sum(1).double()
    assert mean_l0(sae, x) == pytest.approx(float(l0.mean()))
    assert sparsity_metrics(sae, x).l0_mean == pytest.approx(float(l0.mean()))
    assert sparsity_metrics(sae, x).l0_p90 == pytest.approx(float(np.percentile(l0.numpy(), 90)))
    want = direct_reconstruction(x, x_hat)
    got = reconstruction_metrics(sae, x)
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
    assert fvu(sae, x) == pytest.approx(want["fvu"], rel=1e-6)

    ident = reconstruction_metrics(identity_sae(), x)
    assert ident["fvu"] < 1e-12 and ident["cos_sim"] == pytest.approx(1.0) and ident["l2_ratio"] == pytest.approx(1.0)
    assert ident["relative_reconstruction_bias"] == pytest.approx(1.0)


def test_outlier_rows_are_left_out_and_reported() -> None:
    sae = random_sae()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, D, generator=gen)
    flags = np.zeros(300, bool)
    flags[[5, 150, 299]] = True
    x[torch.from_numpy(flags)] *= 200.0  # massive-norm rows that would dominate the variance
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    parts = [(x[s : s + 128], flags[s : s + 128]) for s in range(0, 300, 128)]

    result = evaluate_activations(sae, parts).figures()
    keep = torch.from_numpy(~flags)
    rc = result["reconstruction"]
    assert rc["fvu"] == pytest.approx(direct_reconstruction(x[keep], x_hat[keep])["fvu"], rel=1e-6)
    assert rc["fvu_with_outliers"] == pytest.approx(direct_reconstruction(x, x_hat)["fvu"], rel=1e-6)
    assert rc["outlier_rows"] == 3 and rc["outliers_included"] is False
    assert rc["tokens"] == result["sparsity"]["tokens"] == 297

    included = evaluate_activations(sae, parts, include_outliers=True).figures()
    assert included["reconstruction"]["fvu"] == pytest.approx(rc["fvu_with_outliers"], rel=1e-12)
    assert included["sparsity"]["tokens"] == 300

    with pytest.raises(ValueError, match="all of them are outliers"):
        evaluate_activations(sae, [(x[:2], np.ones(2, bool))])


# ---- ablation ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))


def test_splice_leaves_position_0_alone() -> None:
    activation = torch.randn(2, 5, 4)
    out = splice_hook(torch.zeros_like)(activation, None)
    assert torch.equal(out[:, 0], activation[:, 0]) and (out[:, 1:] == 0).all()


def test_identity_sae_recovers_everything(model, tokens) -> None:
    out = ablation_metrics(model, HOOK, identity_sae(), tokens)
    assert out["tokens"] == 3 * 18  # positions 1 .. 18 of each window: never position 0, never the last
    assert out["kl_zero"] > 1e-4 and abs(out["ce_zero"] - out["ce_clean"]) > 1e-4  # zeroing matters
    assert out["kl_sae"] < 1e-7 and out["kl_sae_with_error"] < 1e-7
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert out["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert "ce_mean" not in out  # no mean given, no mean ablation


def test_zero_sae_recovers_nothing(model, tokens) -> None:
    out = ablation_metrics(model, HOOK, zero_sae(), tokens, mean=np.zeros(D))
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert out["kl_sae"] == pytest.approx(out["kl_zero"], rel=1e-6)
    assert out["ce_mean"] == pytest.approx(out["ce_zero"], rel=1e-7)  # a zero mean is zero ablation


def test_error_term_added_back_equals_clean(model, tokens) -> None:
    mean = torch.randn(D, generator=torch.Generator().manual_seed(4))
    out = ablation_metrics(model, HOOK, random_sae(k=2), tokens, mean=mean)
    assert out["kl_sae"] > 1e-5  # the SAE alone does change the model ...
    assert out["kl_sae_with_error"] < 1e-7  # ... its reconstruction plus its error does not (float32 rounding)
    assert out["ce_sae_with_error"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["ce_mean"] != pytest.approx(out["ce_zero"])
    want = (out["ce_mean"] - out["ce_sae"]) / (out["ce_mean"] - out["ce_clean"])
    assert out["ce_loss_recovered_vs_mean"] == pytest.approx(want)


def test_scored_positions_exclude_position_0(model, tokens) -> None:
    splices = replacements(identity_sae())
    acc = AblationAccumulator(splices)
    with pytest.raises(ValueError, match=">= 1"):
        acc.add(model, HOOK, splices, tokens, (torch.tensor([0]), torch.tensor([0])))
    with pytest.raises(ValueError, match="next token"):
        acc.add(model, HOOK, splices, tokens, (torch.tensor([0]), torch.tensor([19])))
    with pytest.raises(ValueError, match="seq >= 3"):
        ablation_metrics(model, HOOK, identity_sae(), tokens[:, :2])


def toy_cache(lengths: list[int], split: list[int], seed: int = 0) -> TokenCache:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenCache(tokens=rng.integers(0, 500, offsets[-1]).astype(np.int32), offsets=offsets,
                      split=np.asarray(split, dtype=np.int8), attrs={})


@pytest.mark.parametrize("bos_id", [None, 511])
def test_corpus_ablation_scores_each_split_token_once(model, bos_id) -> None:
    cache = toy_cache([9, 30, 4, 17, 1, 60], [1, 1, 0, 1, 1, 1])
    bos = bos_id is not None
    plan = ablation_plan(cache, "validation", max_text_length=16, prepend_bos=bos, overlap=4, max_tokens=None)
    assert set(plan.doc.tolist()) == {0, 1, 3, 5}  # validation documents long enough to score anything
    sae = random_sae(k=4)
    out = evaluate_ablation(model, HOOK, sae, cache, plan, bos_id=bos_id, token_budget=40, progress=False)
    # every validation token but each document's first (and, without BOS, its second: predicted from position 0)
    lengths = np.array([9, 30, 17, 1, 60])
    assert out["tokens"] == int(np.maximum(lengths - 2 + int(bos), 0).sum()) == scored_per_window(plan, bos).sum()
    assert out["windows"] == len(plan)

    # short documents fit one window: the corpus pass equals one call per document, weighted by predictions
    short = toy_cache([9, 12], [1, 1], seed=1)
    plan = ablation_plan(short, "validation", max_text_length=16, prepend_bos=bos, overlap=4, max_tokens=None)
    corpus = evaluate_ablation(model, HOOK, sae, short, plan, bos_id=bos_id, token_budget=64, progress=False)
    per_doc = []
    for d in range(2):
        ids = torch.from_numpy(short.document(d).astype(np.int64))
        if bos:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        per_doc.append(ablation_metrics(model, HOOK, sae, ids[None]))
    n = [r["tokens"] for r in per_doc]
    assert corpus["tokens"] == sum(n)
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        want = sum(r[key] * k for r, k in zip(per_doc, n, strict=True)) / sum(n)
        assert corpus[key] == pytest.approx(want, rel=1e-5), key


def test_ablation_plan_stops_at_max_tokens() -> None:
    cache = toy_cache([40, 40, 40], [1, 1, 1])
    plan = ablation_plan(cache, "validation", max_text_length=16, prepend_bos=False, overlap=4, max_tokens=30)
    scored = scored_per_window(plan, False)
    assert scored.sum() <= 30 and len(plan) >= 1 and set(plan.doc.tolist()) == {0}
    one = ablation_plan(cache, "validation", max_text_length=16, prepend_bos=False, overlap=4, max_tokens=1)
    assert len(one) == 1  # at least one window
