"""Stage `summarize` on the tiny model's run: one line per feature, logit lens through the real unembedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import with_section
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.logit_lens import logit_effects
from saepipe.errors import UserError
from saepipe.model.loading import load_hooked_model
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import SUMMARY_INDEX, activation_db, analysis_dir, evaluated_sae, matrices_dir
from saepipe.sae.formats import load_sae
from saepipe.stages import activation_db as activation_db_stage
from saepipe.stages import summarize


def brute_force_neighbours(W_dec: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    ids = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(cosine, ids, 1).astype(np.float32)


@pytest.fixture(scope="module")
def summarized(trained_pipeline):
    """The DB, top-k files as the matrices stage writes them (computed here by brute force), then summarize."""
    params = with_section(trained_pipeline, "summarize", top_k=4, context_before=3, context_after=1,
                          quantile_examples=2, logit_tokens=5, neighbours=3)
    if not activation_db(params).is_file():
        activation_db_stage.run(params)
    sae = load_sae(evaluated_sae(params))
    W_dec = sae.W_dec.detach().numpy()
    folder = matrices_dir(params)
    folder.mkdir(parents=True, exist_ok=True)
    ids, values = brute_force_neighbours(W_dec, 5)
    np.savez(folder / "similarity_topk.npz", ids=ids, values=values)
    np.savez(folder / "cooccurrence_topk.npz", ids=ids, jaccard=np.abs(values), counts=np.ones_like(ids))
    (folder / "metadata.json").unlink(missing_ok=True)  # a matrices run's (another module's): not these files
    summarize.run(params)
    lines = (analysis_dir(params) / summarize.SUMMARIES).read_text(encoding="utf-8").splitlines()
    return params, [json.loads(line) for line in lines], (ids, values)


def test_one_line_per_feature_with_stats_and_examples(summarized) -> None:
    params, summaries, _ = summarized
    with ActivationDB(activation_db(params)) as db:
        assert [s["id"] for s in summaries] == list(range(db.d_sae))
        for s in summaries:
            stats = db.feature_stats(s["id"])
            assert (s["alive"], s["count"], s["max"]) == (stats["alive"], stats["count"], stats["max"])
            if not s["alive"]:
                assert s["top_examples"] == [] and s["top_tokens"] == []
                continue
            top = s["top_examples"]
            assert len(top) == min(4, s["count"])
            assert [e["activation"] for e in top] == sorted((e["activation"] for e in top), reverse=True)
            assert top[0]["activation"] == pytest.approx(s["max"], rel=1e-3)
            assert all(len(e["tokens"]) == len(e["activations"]) <= 5 for e in top)
            assert set(s["quantile_examples"]) == {"0.25", "0.5"}
            assert sum(t["count"] for t in s["top_tokens"]) <= s["count"]


def test_top_tokens_count_the_feature_rows(summarized) -> None:
    params, summaries, _ = summarized
    with ActivationDB(activation_db(params)) as db:
        s = max(summaries, key=lambda s: s["count"])
        rows, _ = db.feature_rows(s["id"])
        counts = np.bincount(db.row_token[rows])
        assert s["top_tokens"][0]["count"] == counts.max()
        assert s["top_tokens"][0]["id"] == int(np.argmax(counts))
        # token_share: the share of the token's own (non-outlier) occurrences the feature fires on
        kept = ~db.row_outlier if not db.attrs.get("outliers_included") else np.ones(db.n_rows, bool)
        for t in s["top_tokens"]:
            occurrences = int(((db.row_token == t["id"]) & kept).sum())
            assert t["token_share"] == pytest.approx(t["count"] / occurrences, abs=1e-4) and t["token_share"] <= 1


def test_logit_lens_matches_the_model_unembedding(summarized) -> None:
    params, summaries, _ = summarized
    model = load_hooked_model(params.base_model.output_dir, device=torch.device("cpu"))
    tokenizer = load_tokenizer(params.base_model.output_dir)
    W_dec = load_sae(evaluated_sae(params)).W_dec.detach()
    with torch.no_grad():
        effects = (W_dec * model.ln_final.w) @ model.W_U  # RMSNorm: scale only, no centring
    for s in summaries[:20]:
        expected = torch.topk(effects[s["id"]], 5)
        assert [t["id"] for t in s["promoted_tokens"]] == expected.indices.tolist()
        assert [t["logit"] for t in s["promoted_tokens"]] == pytest.approx(expected.values.tolist(), abs=1e-3)
        assert [t["id"] for t in s["suppressed_tokens"]] == torch.topk(-effects[s["id"]], 5).indices.tolist()
        assert s["promoted_tokens"][0]["token"] == tokenizer.decode([s["promoted_tokens"][0]["id"]])


def test_logit_effects_centre_for_layernorm() -> None:
    torch.manual_seed(0)
    W_dec, W_U, scale = torch.randn(10, 6), torch.randn(6, 30), torch.rand(6) + 0.5
    ids, _, _, low = logit_effects(W_dec, W_U, scale, center=True, k=3, block=4)
    direct = ((W_dec - W_dec.mean(1, keepdim=True)) * scale) @ W_U
    assert torch.equal(ids, direct.topk(3).indices)
    assert torch.allclose(low, direct.topk(3, largest=False).values)


def test_neighbours_come_from_the_matrices_files(summarized) -> None:
    _, summaries, (ids, values) = summarized
    for s in summaries[:10]:
        assert [n["id"] for n in s["nearest_features"]] == ids[s["id"], :3].tolist()
        assert [n["cosine"] for n in s["nearest_features"]] == pytest.approx(values[s["id"], :3], abs=1e-4)


def test_show_feature_reads_the_logit_lens_and_matrices_of_this_sae(summarized, tmp_path, capsys) -> None:
    """show-feature cannot compute the logit lens (it needs the model): it prints the summary line's, as many
    as --logit-tokens asks; the neighbours come from the matrices files once they are of the DB's SAE."""
    from helpers import write_params
    from saepipe.cli import main
    from saepipe.paths import MATRICES_METADATA

    params, summaries, (ids, values) = summarized
    params_file = write_params(params, tmp_path / "params.yaml")
    s = next(s for s in summaries if s["alive"])

    def shown(*flags: str) -> str:
        assert main(["show-feature", str(s["id"]), "--params", params_file, *flags]) == 0
        return capsys.readouterr().out

    out = shown("--logit-tokens", "2")
    promoted = ", ".join(f"{t['token']!r} {t['logit']:+.2f}" for t in s["promoted_tokens"][:2])
    suppressed = ", ".join(f"{t['token']!r} {t['logit']:+.2f}" for t in s["suppressed_tokens"][:2])
    assert f"\n  promotes  {promoted}\n  suppresses {suppressed}\n" in out
    assert "which keeps 5 per feature" in shown("--logit-tokens", "9")  # the fixture's summarize kept 5
    assert "from the decoder rows of" in out  # top-k files without metadata: not known to be of this SAE
    with ActivationDB(activation_db(params)) as db:
        sha256 = db.attrs["sae_sha256"]
    meta = matrices_dir(params) / MATRICES_METADATA
    try:
        meta.write_text(json.dumps({"sae_sha256": sha256}))
        out = shown("--neighbours", "2")
    finally:
        meta.unlink()
    nearest = ", ".join(f"{i} {v:.3f}" for i, v in zip(ids[s["id"], :2], values[s["id"], :2], strict=True))
    assert f"nearest features by decoder cosine (from {matrices_dir(params)}): {nearest}\n" in out
    assert "co-occurring features (Jaccard, tokens both fire on): " in out


def test_index_lists_every_feature(summarized) -> None:
    params, summaries, _ = summarized
    index = json.loads((analysis_dir(params) / SUMMARY_INDEX).read_text())
    assert [e["id"] for e in index] == [s["id"] for s in summaries]
    assert index[0]["top_tokens"] == [t["token"] for t in summaries[0]["top_tokens"][: params.summarize.index_tokens]]


def test_missing_matrices_is_a_user_error(summarized, tmp_path) -> None:
    params, _, _ = summarized
    (matrices_dir(params) / "cooccurrence_topk.npz").rename(tmp_path / "kept.npz")
    try:
        with pytest.raises(UserError, match="run `saepipe matrices` first"):
            summarize.run(params)
    finally:
        (tmp_path / "kept.npz").rename(matrices_dir(params) / "cooccurrence_topk.npz")
