"""Stage `activations`: rows equal the model's hook activations, bookkeeping is exact, errors are clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import with_section
from saepipe.activations.cache import ActivationCache
from saepipe.cli import main
from saepipe.corpus.tokens import VALIDATION, read_token_cache, write_token_cache
from saepipe.errors import UserError
from saepipe.model.loading import load_hooked_model
from saepipe.stages import activations, tokenize


def cache_path(params) -> Path:
    return Path(params.activations.output_dir) / "activations.h5"


@pytest.fixture
def tokenized(tiny_params):
    tokenize.run(tiny_params)
    return tiny_params


def window_forward(bridge, tokens: np.ndarray, hook: str, layer: int) -> torch.Tensor:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.as_tensor(tokens[None], dtype=torch.long), names_filter=hook,
                                         stop_at_layer=layer + 1)
    return cache[hook][0]


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_rows_match_the_model_and_cover_every_token_once(tokenized, prepend_bos) -> None:
    params = with_section(tokenized, "activations", prepend_bos=prepend_bos, storage_dtype="float32")
    activations.run(params)
    tokens = read_token_cache(params.tokenize.output)
    bridge = load_hooked_model(params.base_model.output_dir, device=torch.device("cpu"))
    n = 32 - int(prepend_bos)
    overlap = 8
    bos = [bridge.tokenizer.bos_token_id] if prepend_bos else []
    with ActivationCache(cache_path(params)) as cache:
        assert cache.attrs["hook"] == "blocks.0.hook_resid_post"
        assert cache.attrs["context_overlap"] == overlap
        assert cache.attrs["prepend_bos"] == prepend_bos
        seen = set()
        for split in ("train", "validation"):
            docs, positions = cache.column(split, "doc_ids"), cache.column(split, "positions")
            token_ids = cache.column(split, "token_ids")
            assert (tokens.split[docs] == (VALIDATION if split == "validation" else 0)).all()
            for d, p, t in zip(docs.tolist(), positions.tolist(), token_ids.tolist(), strict=True):
                assert (d, p) not in seen
                seen.add((d, p))
                assert tokens.document(d)[p] == t
            rows = cache.read(split)
            # check a sample of rows against a direct forward over the window that should hold them
            for i in np.random.default_rng(0).choice(len(rows), size=min(40, len(rows)), replace=False):
                d, p = int(docs[i]), int(positions[i])
                start = 0 if p < n else ((p - overlap) // (n - overlap)) * (n - overlap)
                window = np.concatenate([bos, tokens.document(d)[start : start + n]]).astype(np.int64)
                direct = window_forward(bridge, window, "blocks.0.hook_resid_post", 0)[p - start + len(bos)]
                assert torch.allclose(rows[i], direct, atol=1e-5), (d, p)
        first = 0 if prepend_bos else 1
        expected = {(d, p) for d in range(tokens.n_documents) for p in range(first, len(tokens.document(d)))}
        assert seen == expected  # every token once; position 0 only when a BOS takes the sink's place


def test_stats_outliers_and_roundtrip(tokenized) -> None:
    params = with_section(tokenized, "activations", outlier_factor=1.05, storage_dtype="float16")
    activations.run(params)
    stats = json.loads((Path(params.activations.output_dir) / "stats.json").read_text())
    with ActivationCache(cache_path(params)) as cache:
        assert cache.file["train"]["activations"].dtype == np.float16
        norms = cache.column("train", "norms")
        outlier = cache.column("train", "outlier")
        threshold = 1.05 * np.median(norms)
        assert cache.attrs["outlier_threshold"] == pytest.approx(threshold)
        assert np.array_equal(outlier, norms > threshold)
        assert 0 < outlier.sum() < len(norms)
        rows = cache.read("train").double()
        expected_mean = rows[torch.from_numpy(~outlier)].mean(0).numpy()
        assert np.allclose(cache.mean("train"), expected_mean, atol=1e-3 * np.abs(expected_mean).max())
        assert cache.split_attrs("train")["mean_norm"] == pytest.approx(norms[~outlier].mean(), rel=1e-5)
        stored_norms = torch.linalg.vector_norm(rows, dim=1).numpy()
        assert np.allclose(stored_norms, norms, rtol=2e-3)
        assert 0 < cache.attrs["roundtrip_rel_error_mean"] <= cache.attrs["roundtrip_rel_error_max"] < 1e-3
        batches = list(cache.iter_batches("train", 100))
        assert sum(len(r) for r, _ in batches) == int((~outlier).sum())
        assert not outlier[np.concatenate([i for _, i in batches])].any()
    assert stats["train"]["outliers"] == int(outlier.sum())
    assert stats["cached_rows"] == stats["train"]["rows"] + stats["validation"]["rows"]
    assert stats["recompute_factor"] == pytest.approx(stats["model_tokens"] / stats["cached_rows"])
    assert stats["recompute_factor"] > 1


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 1e-2), ("float32", 0.0)])
def test_storage_dtypes_round_trip(tokenized, dtype, bound) -> None:
    params = with_section(tokenized, "activations", storage_dtype=dtype)
    activations.run(params)
    with ActivationCache(cache_path(params)) as cache:
        assert cache.attrs["roundtrip_rel_error_max"] <= bound
        rows = cache.read("train")
        norms = cache.column("train", "norms")
        assert rows.dtype == torch.float32
        assert np.allclose(torch.linalg.vector_norm(rows, dim=1).numpy(), norms, rtol=max(bound, 1e-6))


def test_max_tokens_samples_whole_documents_from_both_splits(tokenized, capsys) -> None:
    tokens = read_token_cache(tokenized.tokenize.output)
    params = with_section(tokenized, "activations", max_tokens=100)
    activations.run(params)
    with ActivationCache(cache_path(params)) as cache:
        rows = {s: cache.n_rows(s) for s in ("train", "validation")}
        docs = {s: set(cache.column(s, "doc_ids").tolist()) for s in ("train", "validation")}
        assert cache.attrs["documents"] == len(docs["train"] | docs["validation"])
    assert 100 <= sum(rows.values()) < 100 + 2 * int(tokens.lengths().max())
    assert rows["validation"] > 0 and docs["validation"]
    with ActivationCache(cache_path(params)) as cache:
        all_docs = np.concatenate([cache.column(s, "doc_ids") for s in ("train", "validation")])
    counts = np.bincount(all_docs, minlength=tokens.n_documents)
    assert np.array_equal(counts[counts > 0], tokens.lengths()[counts > 0] - 1)  # whole documents: all but position 0
    assert "sampled of" in capsys.readouterr().out
    resampled = with_section(params, "activations", seed=1, output_dir=str(Path(params.activations.output_dir) / "b"))
    activations.run(resampled)
    with ActivationCache(cache_path(resampled)) as cache:
        other = set(cache.column("train", "doc_ids").tolist()) | set(cache.column("validation", "doc_ids").tolist())
    assert other != docs["train"] | docs["validation"]  # the seed draws the sample


def test_a_split_without_a_cacheable_document_is_an_error(tokenized) -> None:
    tokens = read_token_cache(tokenized.tokenize.output)
    # one-token validation documents have no row to cache without BOS (position 0 never is)
    documents = [tokens.document(d)[:1] if tokens.split[d] == VALIDATION else tokens.document(d)
                 for d in range(tokens.n_documents)]
    attrs = {k: v for k, v in tokens.attrs.items() if k not in ("format", "format_version", "n_documents", "n_tokens")}
    write_token_cache(tokenized.tokenize.output, documents, tokens.split, attrs)
    with pytest.raises(UserError, match=r"no validation document .*\(tokenize\.val_fraction=0\.25\)"):
        activations.run(tokenized)
    assert not cache_path(tokenized).exists()


def test_interrupted_stage_leaves_nothing_that_looks_finished(tokenized, monkeypatch) -> None:
    calls = {"n": 0}
    real = activations.extract

    def dying_extract(*args, **kwargs):
        sink = args[8]

        def failing_sink(rows, wb):
            calls["n"] += 1
            sink(rows, wb)
            raise KeyboardInterrupt

        return real(*args[:8], failing_sink, *args[9:], **kwargs)

    monkeypatch.setattr(activations, "extract", dying_extract)
    with pytest.raises(KeyboardInterrupt):
        activations.run(tokenized)
    out = Path(tokenized.activations.output_dir)
    assert calls["n"] == 1
    assert list(out.iterdir()) == []  # no activations.h5, no temporary file left behind


def test_tokenizer_mismatch_is_refused(tokenized, tmp_path) -> None:
    import h5py

    with h5py.File(tokenized.tokenize.output, "a") as f:
        f.attrs["tokenizer_fingerprint"] = "0" * 16
    with pytest.raises(UserError, match="different tokenizer"):
        activations.run(tokenized)


def test_no_bos_token_is_a_clear_error(tokenized, tmp_path) -> None:
    import shutil

    model_dir = tmp_path / "nobos"
    shutil.copytree(tokenized.base_model.output_dir, model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    params = with_section(tokenized, "base_model", output_dir=str(model_dir))
    tokenize.run(params)
    params = with_section(params, "activations", prepend_bos=True)
    with pytest.raises(UserError, match="prepend_bos=True: expected false"):
        activations.run(params)


def write_params(params, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hook-layer", "7"], "activations.hook_layer=7: expected an integer in [0, 1] (2 layers)"),
        (["--hook-name", "hook_nope"], "activations.hook_name='hook_nope': expected a hook inside a block"),
        (["--load-in-4bit"], "activations.load_in_4bit=True: expected false on cpu"),
        (["--context-overlap", "40"], "activations.context_overlap=40: expected an integer in [1, 31]"),
        (["--max-text-length", "9999"], "activations.max_text_length=9999: expected at most the model's context"),
        (["--storage-dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tokenized, tmp_path, capsys, flags, message) -> None:
    params_file = write_params(tokenized, tmp_path / "params.yaml")
    try:
        code = main(["activations", "--params", str(params_file), *flags])
    except SystemExit as exit_:  # argparse's own checks (choices) exit from the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not cache_path(tokenized).exists()
