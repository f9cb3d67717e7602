"""The activation DB on the tiny model's run: CSR and CSC against a dense encode, stats, queries, errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import with_section
from saepipe.activations.cache import ActivationCache
from saepipe.analysis import db_build
from saepipe.analysis.activation_db import ActivationDB
from saepipe.cli import main
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import activation_cache, activation_db, evaluated_sae
from saepipe.sae.formats import load_sae
from saepipe.stages import activation_db as activation_db_stage


@pytest.fixture(scope="module")
def built(trained_pipeline):
    activation_db_stage.run(trained_pipeline)
    return trained_pipeline


@pytest.fixture(scope="module")
def dense(built):
    """Every DB row's dense feature activations (train rows, then validation), encoded independently."""
    sae = load_sae(evaluated_sae(built))
    with ActivationCache(activation_cache(built)) as cache, torch.no_grad():
        x = torch.cat([cache.read(s) for s in ("train", "validation")])
        meta = {name: np.concatenate([cache.column(s, name) for s in ("train", "validation")])
                for name in ("token_ids", "doc_ids", "positions")}
        features = sae.encode(x).numpy()
    return features, meta


@pytest.fixture
def db(built):
    tokenizer = load_tokenizer(built.base_model.output_dir)
    with ActivationDB(activation_db(built), tokens=built.tokenize.output, tokenizer=tokenizer) as opened:
        yield opened


def test_csr_and_csc_match_the_dense_encode(db, dense) -> None:
    features, meta = dense
    assert (db.n_rows, db.d_sae) == features.shape and db.nnz == int((features > 0).sum())
    for chunk_start, chunk in zip(range(0, db.n_rows, 37), db.csr_chunks(37), strict=True):
        np.testing.assert_allclose(chunk.toarray(), features[chunk_start : chunk_start + 37], rtol=1e-6, atol=1e-6)
    assert np.array_equal(db.row_token, meta["token_ids"]) and np.array_equal(db.row_doc, meta["doc_ids"])
    assert np.array_equal(db.row_position, meta["positions"])
    for f in range(db.d_sae):
        rows, values = db.feature_rows(f)
        assert np.array_equal(np.sort(rows), np.flatnonzero(features[:, f] > 0))
        assert (np.diff(values) <= 0).all()  # descending
        np.testing.assert_allclose(values, features[rows, f], rtol=1e-6)


def test_pool_rows_averages_each_groups_rows(db, dense) -> None:
    features = np.where(db.row_outlier[:, None], 0.0, dense[0])  # outlier rows stay without features
    group = np.random.default_rng(0).integers(-1, 5, db.n_rows)  # -1: left out
    group[group == 3] = -1  # a group without rows pools to zeros
    pooled = db.pool_rows(group, 6, chunk_rows=41)  # chunks that cut through groups
    assert pooled.shape == (6, db.d_sae)
    for g in range(6):
        rows = group == g
        expected = features[rows].mean(0) if rows.any() else np.zeros(db.d_sae)
        np.testing.assert_allclose(pooled[g], expected, rtol=1e-5, atol=1e-6)
    assert db.row_outlier.shape == (db.n_rows,) and db.row_outlier.dtype == bool


def test_stats_and_quantiles_match_numpy(db, dense) -> None:
    features, _ = dense
    alive = 0
    for f in range(db.d_sae):
        fired = features[:, f][features[:, f] > 0]
        stats = db.feature_stats(f)
        assert stats["count"] == len(fired) and stats["density"] == pytest.approx(len(fired) / db.n_rows)
        if len(fired) == 0:
            assert not stats["alive"] and stats["max"] == 0
            continue
        alive += 1
        assert stats["sum"] == pytest.approx(fired.sum(), rel=1e-5)
        assert stats["mean"] == pytest.approx(fired.mean(), rel=1e-5)
        assert stats["max"] == pytest.approx(fired.max(), rel=1e-6)
        for q, value in stats["quantiles"].items():
            assert value == pytest.approx(np.quantile(fired, float(q), method="lower"), rel=1e-6)
    assert alive > db.d_sae // 4


def test_out_of_core_blocks_give_the_same_file(built, tmp_path) -> None:
    sae = load_sae(evaluated_sae(built))
    tokens = read_token_cache(built.tokenize.output)
    kwargs = dict(n_documents=tokens.n_documents, values_dtype="float32", quantiles=[0.5, 0.9], batch_size=64,
                  attrs={}, progress=False)
    with ActivationCache(activation_cache(built)) as cache:
        one = db_build.build_activation_db(tmp_path / "one.h5", sae, cache, ["train", "validation"],
                                           max_memory_mb=64, **kwargs)
        many = db_build.build_activation_db(tmp_path / "many.h5", sae, cache, ["train", "validation"],
                                            max_memory_mb=0, **kwargs)  # every feature a block of its own
    with h5py.File(tmp_path / "one.h5") as a:
        alive = int((a["features/count"][:] > 0).sum())
    assert one.blocks == 1 and many.blocks == alive  # dead features join the next block
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "many.h5") as b:
        for name in ("csr/indptr", "csr/features", "csc/indptr", "csc/rows", "csc/values", "features/quantiles"):
            assert np.array_equal(a[name][:], b[name][:]), name


def test_feature_blocks_never_split_a_feature() -> None:
    counts = np.array([3, 0, 5, 1, 9, 2])
    assert db_build.feature_blocks(counts, 6) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert db_build.feature_blocks(counts, 100) == [(0, 6)]


def test_top_examples_are_the_largest_with_their_windows(db, dense, built) -> None:
    features, _ = dense
    tokens = read_token_cache(built.tokenize.output)
    tokenizer = load_tokenizer(built.base_model.output_dir)
    f = int(np.argmax((features > 0).sum(0)))
    top = db.top_examples(f, k=5, context=(6, 2))
    expected = np.sort(features[:, f])[::-1][:5]
    np.testing.assert_allclose([e.activation for e in top], expected, rtol=1e-6)
    for example in top:
        document = tokens.document(example.doc)
        lo = max(0, example.position - 6)
        window = document[lo : min(len(document), example.position + 3)]
        assert example.tokens == [tokenizer.decode([t]) for t in window.tolist()]
        assert example.marked == example.position - lo and example.activations[example.marked] > 0
        for offset, value in enumerate(example.activations):  # the feature's value on every token of the window
            row = np.flatnonzero((db.row_doc == example.doc) & (db.row_position == lo + offset))
            assert value == pytest.approx(features[row[0], f] if len(row) else 0.0, abs=1e-4)
    low = db.quantile_examples(f, 0.25, k=3)
    assert len(low) == 3 and max(e.activation for e in low) <= top[-1].activation


def test_features_at_and_document(db, dense) -> None:
    features, _ = dense
    row = 7
    doc, position = int(db.row_doc[row]), int(db.row_position[row])
    pairs = db.features_at(doc, position)
    assert [f for f, _ in pairs] == sorted(np.flatnonzero(features[row] > 0).tolist(), key=lambda f: -features[row, f])
    view = db.document(doc)
    assert view[position]["features"] == pairs[:3]
    assert db.features_at(doc, 0) == []  # position 0 is never cached (no BOS)


def test_search_tokens_matches_a_brute_force_mean(db, dense, built) -> None:
    features, meta = dense
    tokenizer = load_tokenizer(built.base_model.output_dir)
    token = int(np.bincount(meta["token_ids"]).argmax())
    text = tokenizer.decode([token])
    results = db.search_tokens(text, k=3)
    occurrences = np.flatnonzero(meta["token_ids"] == token)
    if not text.startswith(" "):  # the search also counts the spaced spelling when that is one token
        spaced = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            occurrences = np.union1d(occurrences, np.flatnonzero(meta["token_ids"] == spaced[0]))
    means = features[occurrences].mean(0)
    assert [r.feature for r in results] == np.argsort(-means, kind="stable")[:3].tolist()
    assert results[0].mean_activation == pytest.approx(means.max(), rel=1e-5)
    assert results[0].occurrences == len(occurrences)


def test_attributes_name_the_sources(db, built) -> None:
    attrs = db.attrs
    assert attrs["sae_path"] == str(evaluated_sae(built)) and len(attrs["sae_sha256"]) == 64
    assert attrs["hook"] == "blocks.0.hook_resid_post"
    assert attrs["activation_cache"] == str(activation_cache(built))
    assert attrs["token_cache"] == built.tokenize.output and attrs["saepipe_version"]
    db.check_sae(evaluated_sae(built))


def test_a_replaced_export_is_refused_naming_what_changed(db, built, tmp_path) -> None:
    import json
    import shutil

    other = tmp_path / "default"
    shutil.copytree(evaluated_sae(built), other)
    config = json.loads((other / "config.json").read_text())
    config["hook"] = "blocks.1.hook_resid_post"
    (other / "config.json").write_text(json.dumps(config))
    db.check_sae(other)  # the same weights: the DB still holds its features
    tensors = torch.load(other / "weights.pt", weights_only=True)
    tensors["W_dec"] += 0.1
    torch.save(tensors, other / "weights.pt")
    with pytest.raises(UserError) as refused:
        db.check_sae(other)
    message = str(refused.value)
    assert message.startswith(f"{db.path} is stale: built from another SAE than the one now at {other} (weights "
                              f"sha256 {db.attrs['sae_sha256'][:12]} -> ")
    assert "; hook blocks.0.hook_resid_post -> blocks.1.hook_resid_post)" in message
    assert message.endswith("rebuild it with `saepipe activation-db` (or `dvc repro activation_db`)")


def test_truncated_and_foreign_files_give_one_line(built, tmp_path, capsys) -> None:
    source = activation_db(built)
    truncated = tmp_path / "analysis" / "default" / "activation_db.h5"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(UserError, match=str(truncated)):
        ActivationDB(truncated)
    params = with_section(built, "evaluate", output_dir=str(tmp_path / "analysis"))
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(params.to_dict()))
    assert main(["show-feature", "3", "--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(truncated) in err
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something"
    with pytest.raises(UserError, match="not a saepipe activation DB"):
        ActivationDB(tmp_path / "other.h5")


def test_an_interrupted_build_leaves_nothing(built, tmp_path, monkeypatch) -> None:
    params = with_section(built, "evaluate", output_dir=str(tmp_path / "analysis"))
    calls = {"n": 0}
    real = db_build.encode_rows

    def dying(sae, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(sae, x)

    monkeypatch.setattr(db_build, "encode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        activation_db_stage.run(params)
    folder = tmp_path / "analysis" / "default"
    assert not folder.exists() or not any(folder.iterdir())


def _show_params(built) -> Path:
    from helpers import write_params

    return Path(write_params(built, Path(built.tokenize.output).parent / "params_show.yaml"))


def test_show_feature_prints_stats_and_marked_examples(built, capsys) -> None:
    params_file = _show_params(built)
    with ActivationDB(activation_db(built)) as opened:
        f = int(np.argmax(opened.counts))
    assert main(["show-feature", str(f), "--params", str(params_file), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"feature {f}: fires on") and "top 3 examples" in out and "«" in out
    assert "\x1b[" not in out  # not a TTY: plain text
    assert main(["show-feature", "--search", "the", "--params", str(params_file)]) == 0
    assert "features most active on 'the'" in capsys.readouterr().out
    assert main(["show-feature", "--params", str(params_file)]) == 2
    capsys.readouterr()
    for args, field in ((["--search", " "], "--search=' '"), (["--search", "the", "--results", "0"], "--results=0"),
                        (["--search", "the", "--results", "-5"], "--results=-5"), (["--", "-3"], "feature=-3")):
        assert main(["show-feature", "--params", str(params_file), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert field in err and len(err.splitlines()) == 1, err


def test_show_feature_flags_change_what_it_prints(built, db, capsys) -> None:
    """--top-tokens, --neighbours and --logit-tokens each shape their section; index-tokens is not offered."""
    from saepipe.analysis.matrices import decoder_cosine_topk
    from saepipe.analysis.summaries import top_tokens

    params_file = _show_params(built)
    f = int(np.argmax(db.counts))
    show = ["show-feature", str(f), "--params", str(params_file)]
    assert main([*show, "--top-tokens", "2", "--neighbours", "3"]) == 0
    out = capsys.readouterr().out
    expected = top_tokens(db, db.feature_rows(f)[0], 2)  # ranked as the summaries rank them
    shares = ", ".join(f"{t['token']!r} {t['count'] / db.counts[f]:.0%}" for t in expected)
    assert f"top tokens (share of its {int(db.counts[f]):,} firings): {shares}\n" in out
    # No matrices stage has run: the nearest come from the export's decoder rows, as the matrices stage ranks them.
    ids, _ = decoder_cosine_topk(load_sae(evaluated_sae(built)).W_dec, 3, block_size=64)
    line = next(x for x in out.splitlines() if x.startswith("nearest features by decoder cosine"))
    assert [int(p.split()[0]) for p in line.split(": ", 1)[1].split(", ")] == ids[f].tolist()
    assert "logit lens: not computed yet (it needs the model): run `saepipe summarize`" in out
    assert main([*show, "--neighbours", "0"]) == 0
    assert "nearest features" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # argparse's own refusal (the bad-input table checks its one line)
        main([*show, "--index-tokens", "3"])
    assert "unrecognized arguments: --index-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show-feature", "--help"])
    help_text = capsys.readouterr().out
    assert "--index-tokens" not in help_text and "--case-sensitive" in help_text and "Allowed: 0 to 256" in help_text


def test_show_feature_search_merges_case_variants_and_describes_features(built, db, capsys) -> None:
    merged = db.token_occurrences("the", case_sensitive=False)
    union = np.union1d(db.token_occurrences("the"), db.token_occurrences("The"))
    assert len(db.token_occurrences("The")) and np.array_equal(merged, np.union1d(union, db.token_occurrences("THE")))
    assert db.search_tokens("the", 3, case_sensitive=False)[0].occurrences == len(merged)
    params_file = _show_params(built)
    assert main(["show-feature", "--search", "the", "--results", "3", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"features most active on 'the' (any case; {len(merged):,} occurrences):"
    best = db.search_tokens("the", 3, case_sensitive=False)
    for r, line in zip(best, out[2:], strict=True):
        described = top_tokens_of(db, r.feature)
        assert line.split()[0] == str(r.feature) and f"{int(db.counts[r.feature]):,}" in line
        assert line.endswith(", ".join(f"{t['token']!r} {t['count'] / db.counts[r.feature]:.0%}" for t in described))
    assert main(["show-feature", "--search", "the", "--case-sensitive", "--params", str(params_file)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"(as spelled; {len(db.token_occurrences('the')):,} occurrences)" in first


def top_tokens_of(db, f: int) -> list:
    from saepipe.analysis.summaries import top_tokens

    return top_tokens(db, db.feature_rows(f)[0], 3)


def test_show_feature_loads_neither_torch_nor_transformers(built, tmp_path) -> None:
    """A query and a refusal of an id the DB's size rules out need neither (they took seconds to import)."""
    import subprocess
    import sys

    params_file = _show_params(built)
    with ActivationDB(activation_db(built)) as opened:
        d_sae = opened.d_sae
    script = ("import sys; from saepipe.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    for argv, rc in (([str(d_sae)], 2), (["1"], 0), (["--search", "the"], 0)):
        done = subprocess.run([sys.executable, "-c", script, "show-feature", *argv, "--params", str(params_file)],
                              capture_output=True, text=True, check=True)
        assert done.stdout.splitlines()[-1] == f"{rc} []", (argv, done.stdout[-300:], done.stderr[-500:])
        if rc == 2:
            assert f"feature {d_sae}: expected an id in [0, {d_sae - 1}]" in done.stderr


@pytest.mark.parametrize("stage", ["matrices", "summarize"])
def test_analysis_stages_refuse_missing_inputs_before_importing_torch(built, tmp_path, stage) -> None:
    import subprocess
    import sys

    from helpers import with_section, write_params

    params_file = write_params(with_section(built, "evaluate", output_dir=str(tmp_path / "none")),
                               tmp_path / "params.yaml")
    script = ("import sys; from saepipe.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, stage, "--params", params_file],
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "2 False", done.stderr[-500:]
    assert str(tmp_path / "none") in done.stderr


def test_reading_tokenizer_decodes_and_encodes_like_transformers(built) -> None:
    from saepipe.model.tokenizer import load_reading_tokenizer

    full, light = load_tokenizer(built.base_model.output_dir), load_reading_tokenizer(built.base_model.output_dir)
    assert type(light).__name__ == "_RustTokenizer"
    assert [light.decode([i]) for i in range(len(full))] == [full.decode([i]) for i in range(len(full))]
    for text in ("The mitochondria", " the cell", "pH", "ATP."):
        assert light(text, add_special_tokens=False) == {"input_ids": full(text, add_special_tokens=False)["input_ids"]}


def test_outlier_rows_stay_without_features_unless_included(trained_pipeline, tmp_path) -> None:
    from saepipe.activations.cache import ActivationCacheWriter

    sae = load_sae(evaluated_sae(trained_pipeline))
    with ActivationCache(activation_cache(trained_pipeline)) as real:
        x = real.read("train", 0, 100)
    x[10] *= 1000.0  # a massive-activation row
    writer = ActivationCacheWriter(tmp_path / "cache.h5", sae.d_in, "float32", 10.0, {})
    ids = np.arange(100, dtype=np.int32)
    writer.append("train", x, ids, np.zeros(100, np.int32), ids + 1)
    writer.close()
    kwargs = dict(n_documents=1, values_dtype="float32", quantiles=[0.5], batch_size=32, max_memory_mb=64,
                  attrs={}, progress=False)
    with ActivationCache(tmp_path / "cache.h5") as cache:
        assert cache.column("train", "outlier").tolist() == [i == 10 for i in range(100)]
        left_out = db_build.build_activation_db(tmp_path / "out.h5", sae, cache, ["train"], **kwargs)
        included = db_build.build_activation_db(tmp_path / "in.h5", sae, cache, ["train"], include_outliers=True,
                                                **kwargs)
    assert left_out.outlier_rows == included.outlier_rows == 1
    with ActivationDB(tmp_path / "out.h5") as a, ActivationDB(tmp_path / "in.h5") as b:
        assert a.row_features(10)[0].size == 0 and b.row_features(10)[0].size > 0
        assert a.n_rows == b.n_rows == 100 and a.attrs["counted_rows"] == 99
        assert a.nnz == b.nnz - b.row_features(10)[0].size
        f = int(b.row_features(10)[0][0])
        assert a.feature_stats(f)["count"] == b.feature_stats(f)["count"] - 1
        assert a.feature_stats(f)["density"] == pytest.approx(a.feature_stats(f)["count"] / 99)
        assert a.features_at(0, 12) == b.features_at(0, 12)  # every other row is the same
