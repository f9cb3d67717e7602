"""Sharded and several-hook activation caches: the same rows and statistics as a one-process, one-hook cache,
read transparently by train, evaluate and activation-db."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import with_section, write_params
from saepipe.activations.cache import ActivationCache
from saepipe.errors import UserError
from saepipe.paths import SHARDS_NOTE
from saepipe.stages import activation_db, activations, evaluate, export, tokenize, train
from test_distributed import torchrun

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
ROW_FIELDS = ("token_ids", "doc_ids", "positions", "norms", "outlier")


@pytest.fixture
def tokenized(tiny_params, tmp_path):
    params = with_section(tiny_params, "train", sae_expansion=2, topk=4, topk_aux=8, batch_size=64, num_epochs=1,
                          lr_warmup_steps=2, device="cpu", output_dir=str(tmp_path / "checkpoints"))
    params = with_section(params, "export", output_dir=str(tmp_path / "sae"))
    params = with_section(params, "evaluate", output_dir=str(tmp_path / "analysis"), device="cpu", batch_size=50,
                          ablation_max_tokens=0)
    params = with_section(params, "activation_db", device="cpu", batch_size=100, values_dtype="float32")
    tokenize.run(params)
    return params


def by_document(cache: ActivationCache, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The split's rows and fields ordered by (document, position)."""
    order = np.lexsort((cache.column(split, "positions"), cache.column(split, "doc_ids")))
    return cache.read(split).numpy()[order], {name: cache.column(split, name)[order] for name in ROW_FIELDS}


def assert_same_cache(a: ActivationCache, b: ActivationCache) -> None:
    for split in ("train", "validation"):
        rows_a, fields_a = by_document(a, split)
        rows_b, fields_b = by_document(b, split)
        np.testing.assert_array_equal(rows_a, rows_b)
        for name in ROW_FIELDS:
            np.testing.assert_array_equal(fields_a[name], fields_b[name])
        np.testing.assert_allclose(a.mean(split), b.mean(split), rtol=1e-9, atol=1e-12)
        stats_a, stats_b = a.split_attrs(split), b.split_attrs(split)
        assert stats_a.keys() == stats_b.keys() and stats_a["rows"] == stats_b["rows"] > 0
        for key in stats_a:
            assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-6), key
    for key in ("hook", "d_model", "storage_dtype", "median_norm", "outlier_threshold",
                "model_name", "tokenizer_fingerprint", "cached_rows", "roundtrip_rel_error_max"):
        expected = b.attrs[key]
        assert a.attrs[key] == (pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected), key


def test_two_rank_cache_is_the_single_process_cache_and_later_stages_read_it(tokenized, tmp_path) -> None:
    activations.run(tokenized)
    single_dir = Path(tokenized.activations.output_dir)
    assert (single_dir / "parts").is_dir() and not any((single_dir / "parts").glob("*.h5"))
    assert (single_dir / "parts" / SHARDS_NOTE).is_file()  # never an empty folder: DVC would warn
    sharded = with_section(tokenized, "activations", output_dir=str(tmp_path / "sharded"))
    done = torchrun(["activations", "--params", write_params(sharded, tmp_path / "p.yaml")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("activations: ") == 1 and "in 2 processes" in done.stdout
    out = tmp_path / "sharded"
    parts = sorted(p.name for p in (out / "parts").glob("*.h5"))
    assert parts == [f"{HOOKS[0]}.rank0.h5", f"{HOOKS[0]}.rank1.h5"]
    with h5py.File(out / "parts" / parts[0]) as first, h5py.File(out / "parts" / parts[1]) as second:
        docs = [set(first[s]["doc_ids"][:]) | set(second[s]["doc_ids"][:]) for s in ("train", "validation")]
        assert first["train/activations"].shape[0] > 0 and second["train/activations"].shape[0] > 0
        assert all(docs)  # both ranks' windows cover the corpus between them
    with ActivationCache(single_dir / "activations.h5") as a, ActivationCache(out / "activations.h5") as b:
        assert_same_cache(a, b)
    assert json.loads((out / "stats.json").read_text())["world_size"] == 2

    # train, export, evaluate and activation-db on the sharded cache, unchanged
    train.run(sharded)
    export.run(sharded)
    evaluate.run(sharded)
    activation_db.run(sharded)
    metrics = json.loads((Path(sharded.evaluate.output_dir) / "default" / "quick" / "metrics.json").read_text())
    assert 0 < metrics["reconstruction"]["fvu"] < 1
    assert (Path(sharded.evaluate.output_dir) / "default" / "activation_db.h5").is_file()

    # a shard gone is an error on open, not rows of zeros; a shard opened on its own is refused
    (out / "parts" / parts[1]).rename(tmp_path / "moved.h5")
    with pytest.raises(UserError, match=r"shard .*rank1\.h5 is missing"):
        ActivationCache(out / "activations.h5")
    with pytest.raises(UserError, match="one process's shard"):
        ActivationCache(out / "parts" / parts[0])
    # a one-process run over the same folder leaves no stale shard behind
    activations.run(sharded)
    assert [p.name for p in (out / "parts").iterdir()] == [SHARDS_NOTE]


def counting_model_loader(monkeypatch) -> list[int]:
    calls = [0]
    real = activations.load_hooked_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.run_with_hooks

        def counted(*a, **k):
            calls[0] += 1
            return forward(*a, **k)

        model.run_with_hooks = counted
        return model

    monkeypatch.setattr(activations, "load_hooked_model", load)
    return calls


def test_two_hooks_from_one_forward_pass_equal_two_single_hook_runs(tokenized, tmp_path, monkeypatch) -> None:
    calls = counting_model_loader(monkeypatch)
    single = {}
    for layer, hook in enumerate(HOOKS):
        params = with_section(tokenized, "activations", hook_layer=layer, output_dir=str(tmp_path / f"one{layer}"))
        before = calls[0]
        activations.run(params)
        single[hook] = (params, calls[0] - before)
    both = with_section(tokenized, "activations", hooks=HOOKS, output_dir=str(tmp_path / "both"))
    before = calls[0]
    activations.run(both)
    assert calls[0] - before == single[HOOKS[0]][1] == single[HOOKS[1]][1] > 1  # one model run per batch
    path = tmp_path / "both" / "activations.h5"
    for hook in HOOKS:
        one = Path(single[hook][0].activations.output_dir) / "activations.h5"
        with ActivationCache(one) as a, ActivationCache(path, hook=hook) as b:
            assert_same_cache(a, b)
            np.testing.assert_array_equal(a.read("train").numpy(), b.read("train").numpy())  # same order too
    with pytest.raises(UserError, match=r"several hooks .*set train.hook"):
        ActivationCache(path)

    # train picks its hook with train.hook; evaluate follows the SAE's hook
    with pytest.raises(UserError, match=r"train\.hook"):
        train.run(both)
    deep = with_section(both, "train", hook=HOOKS[1])
    train.run(deep)
    export.run(deep)
    config = json.loads((Path(deep.export.output_dir) / "default" / "config.json").read_text())
    assert config["hook"] == HOOKS[1]
    evaluate.run(deep)
    evaluated = json.loads((Path(deep.evaluate.output_dir) / "default" / "quick" / "metrics.json").read_text())
    assert evaluated["evaluated"]["hook"] == HOOKS[1]
    with pytest.raises(UserError, match=re.escape(f"holds {HOOKS[0]}, {HOOKS[1]}, not blocks.5.hook_resid_post")):
        train.run(with_section(both, "train", hook="blocks.5.hook_resid_post"))


def test_bad_hook_lists_are_field_errors(tokenized, tmp_path) -> None:
    for hooks, expected in (([HOOKS[0], HOOKS[0]], "distinct hooks"), (["resid"], "'resid' is not one"),
                            (["blocks.9.hook_resid_post"], "layers in [0, 1]")):
        params = with_section(tokenized, "activations", hooks=hooks, output_dir=str(tmp_path / "bad"))
        with pytest.raises(UserError, match=r"activations\.hooks=.*" + re.escape(expected)):
            activations.run(params)
