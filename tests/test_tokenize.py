"""Stage `tokenize` and the token cache format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from saepipe.corpus.tokens import TRAIN, VALIDATION, read_token_cache, split_documents, write_token_cache
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from saepipe.stages import tokenize


def test_split_is_by_document_seeded_and_sized() -> None:
    a = split_documents(100, 0.1, seed=0)
    assert (a == VALIDATION).sum() == 10
    assert np.array_equal(a, split_documents(100, 0.1, seed=0))
    assert not np.array_equal(a, split_documents(100, 0.1, seed=1))
    assert (split_documents(3, 0.01, 0) == VALIDATION).sum() == 1  # never an empty validation split
    assert (split_documents(2, 0.99, 0) == TRAIN).sum() == 1  # never an empty training split
    assert (split_documents(1, 0.5, 0) == TRAIN).all()


def test_stage_writes_documents_in_order_with_tokenizer_identity(tiny_params) -> None:
    tokenize.run(tiny_params)
    cache = read_token_cache(tiny_params.tokenize.output)
    texts = json.loads((Path(tiny_params.process.output_dir) / "texts.json").read_text())
    tokenizer = load_tokenizer(tiny_params.base_model.output_dir)
    assert cache.n_documents == len(texts)
    for doc in (0, 5, len(texts) - 1):
        assert cache.document(doc).tolist() == tokenizer(texts[doc], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(cache.document(doc)) == texts[doc]
    assert cache.attrs["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert cache.attrs["n_tokens"] == len(cache.tokens) == cache.offsets[-1]
    assert cache.attrs["val_fraction"] == 0.25
    assert (cache.split == VALIDATION).sum() == round(0.25 * len(texts))
    assert cache.tokens.dtype == np.int32


def test_one_document_is_refused_naming_val_fraction(tiny_params) -> None:
    texts = Path(tiny_params.process.output_dir) / "texts.json"
    texts.write_text(json.dumps(["The only document of this corpus."]))
    with pytest.raises(UserError, match=r"tokenize\.val_fraction=0\.25: .* validation split empty"):
        tokenize.run(tiny_params)
    assert not Path(tiny_params.tokenize.output).exists()


def test_reader_refuses_foreign_and_damaged_files(tmp_path) -> None:
    with pytest.raises(UserError, match="run `saepipe tokenize` first"):
        read_token_cache(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(UserError, match="not a saepipe token cache"):
        read_token_cache(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        read_token_cache(tmp_path / "junk.h5")
    write_token_cache(tmp_path / "ok.h5", [np.arange(5), np.arange(3)], np.zeros(2, np.int8), {})
    with h5py.File(tmp_path / "ok.h5", "a") as f:
        del f["offsets"]
        f["offsets"] = np.array([0, 5, 9])
    with pytest.raises(UserError, match="offsets do not match"):
        read_token_cache(tmp_path / "ok.h5")
