"""Decoder similarity and co-occurrence against dense numpy on small random cases; the `matrices` stage end to
end on the tiny run's real activation DB."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from helpers import with_section
from saepipe.analysis import matrices
from saepipe.analysis.activation_db import ActivationDB
from saepipe.errors import UserError
from saepipe.paths import activation_db, evaluated_sae
from saepipe.sae.formats import load_sae
from saepipe.stages import activation_db as activation_db_stage


# ---- dense references ------------------------------------------------------------------------------------
def dense_cosine(W: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(W.astype(np.float64), axis=1)
    unit = W / np.where(norms > 0, norms, 1.0)[:, None]
    return unit @ unit.T


def dense_counts(X: scipy.sparse.csr_matrix) -> np.ndarray:
    fired = (X.toarray() > 0).astype(np.int64)
    return fired.T @ fired


def dense_jaccard(C: np.ndarray) -> np.ndarray:
    c = np.diag(C).astype(np.float64)
    union = c[:, None] + c[None, :] - C
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, C / union, 0.0)


def random_csr(rows: int, d_sae: int, density: float, seed: int, never_fire: tuple[int, ...] = ()):
    """Values in (-0.3, 0.7): some stored entries are <= 0 (do not fire); the `never_fire` columns never fire."""
    X = scipy.sparse.random(rows, d_sae, density=density, random_state=seed, format="csr", dtype=np.float32)
    X.data -= 0.3
    X = X.tolil()
    for f in never_fire:
        X[:, f] = 0.0
    return X.tocsr()


def chunks_of(X: scipy.sparse.csr_matrix, chunk_rows: int) -> list[scipy.sparse.csr_matrix]:
    return [X[i:i + chunk_rows] for i in range(0, X.shape[0], chunk_rows)]


# ---- decoder similarity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_decoder_topk_matches_brute_force(block_size):
    torch.manual_seed(0)
    W = torch.randn(40, 12)
    dense = np.zeros((40, 40), np.float32)
    ids, values = matrices.decoder_cosine_topk(W, 5, block_size, dense_out=dense)
    cos = dense_cosine(W.numpy())
    np.fill_diagonal(cos, 1.0)
    np.testing.assert_allclose(dense, cos, atol=1e-6)
    np.fill_diagonal(cos, -np.inf)
    expected = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    assert ids.dtype == np.int64 and values.dtype == np.float32 and ids.shape == (40, 5)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(values, np.take_along_axis(cos, expected, axis=1), atol=1e-6)
    assert (ids != np.arange(40)[:, None]).all()


def test_zero_norm_rows_and_pair_counts():
    torch.manual_seed(1)
    W = torch.randn(30, 6)
    W[4] = 0
    W[9] = 0
    W[11] = 2.5 * W[3] + 1e-3  # a near duplicate of feature 3
    dense = np.zeros((30, 30), np.float32)
    threshold = 0.5
    sim = matrices.decoder_similarity(W, 29, 8, threshold, dense_out=dense)
    cos = dense_cosine(W.numpy())
    np.testing.assert_array_equal(np.diag(dense), np.where(np.isin(np.arange(30), [4, 9]), 0.0, 1.0))
    np.testing.assert_array_equal(dense[4], np.zeros(30))
    np.testing.assert_array_equal(sim.values[4], np.zeros(29))  # zero rows: cosine 0 with every other feature
    assert sim.zero_norm.tolist() == [i in (4, 9) for i in range(30)]
    for i in range(30):
        assert sorted(sim.ids[i].tolist()) == [j for j in range(30) if j != i]  # k = d_sae - 1: every other feature
    assert sim.pairs_above == int((np.triu(cos, 1) > threshold).sum())
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_allclose(sim.max_cosine, cos.max(axis=1), atol=1e-6)
    assert sim.ids[3, 0] == 11 and sim.ids[11, 0] == 3

    figures = matrices.similarity_figures(sim)
    alive = cos.max(axis=1)[~np.isin(np.arange(30), [4, 9])]
    assert figures["mean_max_cosine"] == pytest.approx(alive.mean(), abs=1e-6)
    assert figures["median_max_cosine"] == pytest.approx(np.median(alive), abs=1e-6)
    assert figures["features_with_near_duplicate"] == int((alive > threshold).sum())
    assert figures["zero_norm_features"] == 2

    rows = matrices.max_cosine_histogram(sim, 10)
    counts, edges = np.histogram(alive, bins=10, range=(-1, 1))
    assert [r["features"] for r in rows] == counts.tolist()
    np.testing.assert_allclose([r["max_cosine"] for r in rows], (edges[:-1] + edges[1:]) / 2, atol=1e-6)


def test_pairs_above_threshold_without_dense_matrix():
    torch.manual_seed(2)
    W = torch.randn(50, 3)  # low dimension: many pairs above the threshold
    with_dense = matrices.decoder_similarity(W, 3, 7, 0.8, dense_out=np.zeros((50, 50), np.float32))
    without = matrices.decoder_similarity(W, 3, 7, 0.8)
    assert without.pairs_above == with_dense.pairs_above == int((np.triu(dense_cosine(W.numpy()), 1) > 0.8).sum())
    assert without.pairs_above > 0
    np.testing.assert_array_equal(without.ids, with_dense.ids)


# ---- co-occurrence ---------------------------------------------------------------------------------------
def expected_topk(C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: other features with C > 0 by Jaccard descending, ties by id; padding id -1."""
    J = dense_jaccard(C)
    d = len(C)
    ids = np.full((d, k), -1, np.int64)
    jac = np.zeros((d, k))
    for i in range(d):
        partners = [j for j in range(d) if j != i and C[i, j] > 0]
        partners.sort(key=lambda j: (-J[i, j], j))
        ids[i, :len(partners[:k])] = partners[:k]
        jac[i, :len(partners[:k])] = [J[i, j] for j in partners[:k]]
    return ids, jac


@pytest.mark.parametrize("chunk_rows", [1, 37, 500])
def test_cooccurrence_counts_and_jaccard_match_dense(chunk_rows):
    X = random_csr(300, 25, 0.12, seed=3, never_fire=(5, 17))
    C = dense_counts(X)
    counts_out = np.zeros((25, 25), np.int64)
    jaccard_out = np.zeros((25, 25), np.float32)
    result = matrices.cooccurrence(chunks_of(X, chunk_rows), 25, 6, block_size=4, dense_out=counts_out,
                                   jaccard_out=jaccard_out)
    np.testing.assert_array_equal(counts_out, C)
    np.testing.assert_allclose(jaccard_out, dense_jaccard(C), rtol=1e-6)
    np.testing.assert_array_equal(result.fire_counts, np.diag(C))
    assert result.n_rows == 300
    ids, jac = expected_topk(C, 6)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_allclose(result.jaccard, jac, rtol=1e-6)
    np.testing.assert_array_equal(result.counts, np.where(ids >= 0, C[np.arange(25)[:, None], ids], 0))
    for f in (5, 17):  # never fire: zero counts, rows of padding, no one's partner
        assert result.fire_counts[f] == 0 and (result.ids[f] == -1).all() and not (result.ids == f).any()
        assert (jaccard_out[f] == 0).all()


def test_sparse_path_gives_the_dense_path_topk():
    X = random_csr(400, 60, 0.05, seed=4, never_fire=(0, 33))
    dense = matrices.cooccurrence(chunks_of(X, 64), 60, 8, block_size=16, dense_out=np.zeros((60, 60), np.int64))
    sparse = matrices.cooccurrence(chunks_of(X, 64), 60, 8, block_size=16)
    for name in ("ids", "jaccard", "counts", "fire_counts"):
        np.testing.assert_array_equal(getattr(sparse, name), getattr(dense, name), err_msg=name)
    assert sparse.n_rows == dense.n_rows == 400
    assert (sparse.ids == -1).any() and (sparse.ids >= 0).any()
    assert sparse.figures() == dense.figures()
    assert sparse.figures()["features_never_firing"] == 2


def test_cooccurrence_leaves_the_chunks_alone_and_checks_shapes():
    X = random_csr(50, 10, 0.3, seed=5)
    before = X.copy()
    matrices.cooccurrence([X], 10, 3)
    assert (before != X).nnz == 0 and X.nnz == before.nnz
    with pytest.raises(ValueError, match="expected"):
        matrices.cooccurrence([X], 11, 3)


# ---- the stage -------------------------------------------------------------------------------------------
@pytest.fixture
def stage(trained_pipeline, tmp_path):
    """The tiny run's exported SAE and a real activation DB of it in tmp_path; the DB's CSR and attrs as read."""
    params = with_section(trained_pipeline, "evaluate", sae_path=str(evaluated_sae(trained_pipeline)),
                          output_dir=str(tmp_path / "analysis"))
    params = with_section(params, "matrices", top_k=5, block_size=16, chunk_rows=128, histogram_bins=20)
    activation_db_stage.run(params)
    with ActivationDB(activation_db(params)) as db:
        view = types.SimpleNamespace(csr=scipy.sparse.vstack(list(db.csr_chunks(1000))).tocsr(), counts=db.counts,
                                     attrs=db.attrs, n_rows=db.n_rows)
    return params, types.SimpleNamespace(sae=load_sae(evaluated_sae(params))), view


def test_stage_writes_dense_and_topk_files(stage, capsys):
    from saepipe.stages import matrices as stage_module

    params, ckpt, db = stage
    D_SAE = ckpt.sae.d_sae
    stage_module.run(params)
    analysis = Path(params.evaluate.output_dir) / "default"
    out = analysis / "matrices"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["feature_similarity.npy", "feature_cooccurrence.npy", "feature_cooccurrence_jaccard.npy",
         "similarity_topk.npz", "cooccurrence_topk.npz", "metadata.json"])
    W = ckpt.sae.W_dec.detach().numpy()
    sim = np.load(out / "feature_similarity.npy")
    assert sim.dtype == np.float32 and sim.shape == (D_SAE, D_SAE)
    cos = dense_cosine(W)
    np.fill_diagonal(cos, 1.0)
    np.testing.assert_allclose(sim, cos, atol=1e-5)
    C = dense_counts(db.csr)
    np.testing.assert_array_equal(np.load(out / "feature_cooccurrence.npy"), C)
    np.testing.assert_allclose(np.load(out / "feature_cooccurrence_jaccard.npy"), dense_jaccard(C), rtol=1e-6)
    np.testing.assert_array_equal(np.diag(C), db.counts)

    with np.load(out / "similarity_topk.npz", allow_pickle=False) as topk:
        assert topk["ids"].shape == topk["values"].shape == (D_SAE, 5)
        np.fill_diagonal(cos, -np.inf)
        np.testing.assert_allclose(topk["values"], -np.sort(-cos, axis=1)[:, :5], atol=1e-5)
    with np.load(out / "cooccurrence_topk.npz", allow_pickle=False) as co:
        ids, jac = expected_topk(C, 5)
        np.testing.assert_array_equal(co["ids"], ids)
        np.testing.assert_allclose(co["jaccard"], jac, rtol=1e-6)
        np.testing.assert_array_equal(co["fire_counts"], np.diag(C))

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["dense"] is True and meta["d_sae"] == D_SAE and meta["n_rows"] == db.n_rows
    assert meta["sae_sha256"] == db.attrs["sae_sha256"] and "c_i + c_j - C[i, j]" in meta["jaccard_formula"]
    assert set(meta["files"]) == {p.name for p in out.iterdir()} - {"metadata.json"}

    metrics = json.loads((analysis / "matrices_metrics.json").read_text())
    assert metrics["d_sae"] == D_SAE and metrics["dense"] is True
    assert metrics["mean_max_cosine"] == pytest.approx(cos.max(axis=1).mean(), abs=1e-5)
    assert metrics["pairs_above_threshold"] == int((np.triu(dense_cosine(W), 1) > 0.9).sum())
    assert metrics["cooccurrence"]["tokens"] == db.n_rows
    histogram = json.loads((analysis / "decoder_similarity_histogram.json").read_text())
    assert len(histogram) == 20 and sum(r["features"] for r in histogram) == D_SAE
    assert set(histogram[0]) == {"max_cosine", "features"}
    printed = capsys.readouterr().out
    assert f"matrices: d_sae {D_SAE:,}:" in printed and str(out) in printed and "only the top-k" not in printed


def test_stage_above_the_size_rule_writes_only_topk(stage, capsys):
    from saepipe.stages import matrices as stage_module

    params, ckpt, _ = stage
    D_SAE = ckpt.sae.d_sae
    stage_module.run(params)
    dense_dir = Path(params.evaluate.output_dir) / "default" / "matrices"
    with np.load(dense_dir / "cooccurrence_topk.npz") as co:
        dense_topk = {name: co[name] for name in co.files}
    capsys.readouterr()

    stage_module.run(with_section(params, "matrices", dense_max_features=D_SAE - 1))
    out = Path(params.evaluate.output_dir) / "default" / "matrices"
    assert sorted(p.name for p in out.iterdir()) == ["cooccurrence_topk.npz", "metadata.json", "similarity_topk.npz"]
    assert "only the top-k files were written" in capsys.readouterr().out
    with np.load(out / "cooccurrence_topk.npz") as co:
        for name, array in dense_topk.items():
            np.testing.assert_array_equal(co[name], array, err_msg=name)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["dense"] is False and set(meta["files"]) == {"similarity_topk.npz", "cooccurrence_topk.npz"}
    assert json.loads((out.parent / "matrices_metrics.json").read_text())["dense"] is False


def test_stage_refuses_another_sae(stage, tmp_path):
    from saepipe.stages import matrices as stage_module

    params, _, _ = stage
    other = tmp_path / "sae" / "other"
    shutil.copytree(evaluated_sae(params), other)
    tensors = torch.load(other / "weights.pt", weights_only=True)
    tensors["W_dec"] += 0.1  # other weights, another hash
    torch.save(tensors, other / "weights.pt")
    moved = with_section(params, "evaluate", sae_path=str(other))
    activation_db(moved).parent.mkdir(parents=True)
    shutil.copy(activation_db(params), activation_db(moved))  # a DB of the first SAE where the second's belongs
    with pytest.raises(UserError, match=r"is stale: built from another SAE than the one now at \S*other "
                       r"\(weights sha256 [0-9a-f]{12} -> [0-9a-f]{12}; path \S+ -> \S*other\); rebuild it with "
                       r"`saepipe activation-db` \(or `dvc repro activation_db`\)$"):
        stage_module.run(moved)
    assert not (tmp_path / "analysis" / "other" / "matrices").exists()
