"""The token cache (`data/tokens.h5`): every document's token ids and a train/validation split by document.

Layout (HDF5):
    attrs    format="saepipe.tokens", format_version, tokenizer_name, tokenizer_fingerprint, vocab_size,
             bos_token_id (-1: none), val_fraction, seed, n_documents, n_tokens, texts_sha256
    tokens   int32 [n_tokens]         all documents' ids concatenated; no BOS/EOS added
    offsets  int64 [n_documents + 1]  document d is tokens[offsets[d]:offsets[d + 1]]
    split    int8  [n_documents]      0 = train, 1 = validation

This module is the only reader and writer of that layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.errors import UserError
from saepipe.storage import atomic_h5, open_h5, plain

FORMAT = "saepipe.tokens"
FORMAT_VERSION = 1
TRAIN, VALIDATION = 0, 1
SPLIT_NAMES = {"train": TRAIN, "validation": VALIDATION}


@dataclass(frozen=True)
class TokenCache:
    tokens: np.ndarray
    offsets: np.ndarray
    split: np.ndarray
    attrs: dict[str, Any]

    @property
    def n_documents(self) -> int:
        return len(self.split)

    def document(self, doc: int) -> np.ndarray:
        return self.tokens[self.offsets[doc] : self.offsets[doc + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def split_documents(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded split by document: round(val_fraction * n) documents (at least one, if n >= 2) validate."""
    split = np.full(n_documents, TRAIN, dtype=np.int8)
    if n_documents < 2:
        return split
    n_val = min(n_documents - 1, max(1, round(val_fraction * n_documents)))
    chosen = np.random.default_rng(seed).permutation(n_documents)[:n_val]
    split[chosen] = VALIDATION
    return split


def write_token_cache(
    path: str | Path, documents: Sequence[np.ndarray], split: np.ndarray, attrs: dict[str, Any]
) -> TokenCache:
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(documents).astype(np.int32) if documents else np.zeros(0, np.int32)
    all_attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **attrs,
        "n_documents": len(documents),
        "n_tokens": int(offsets[-1]),
    }
    with atomic_h5(path) as f:
        f.create_dataset("tokens", data=tokens, chunks=True, compression="lzf")
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("split", data=split.astype(np.int8))
        f.attrs.update(all_attrs)
    return TokenCache(tokens=tokens, offsets=offsets, split=split.astype(np.int8), attrs=all_attrs)


def read_token_cache(path: str | Path, matching: Mapping[str, Any] | None = None) -> TokenCache:
    """The token cache at `path`; with `matching` (an activation cache's attrs), refused unless it was made by
    the same tokenizer, since its token ids would otherwise name other words than the cached activations'."""
    path = Path(path)
    try:
        with open_h5(path, "token cache", "tokenize") as f:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT:
                raise UserError(f"{path} is not a saepipe token cache (format={attrs.get('format')!r})")
            if attrs.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{path}: token cache version {attrs.get('format_version')}, "
                                f"expected {FORMAT_VERSION}; rerun `saepipe tokenize`")
            cache = TokenCache(tokens=f["tokens"][:], offsets=f["offsets"][:], split=f["split"][:],
                               attrs={k: plain(v) for k, v in attrs.items()})
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({exc}); rerun `saepipe tokenize`") from None
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: damaged token cache ({exc}); rerun `saepipe tokenize`") from None
    if len(cache.offsets) != cache.n_documents + 1 or cache.offsets[-1] != len(cache.tokens):
        raise UserError(f"{path}: offsets do not match tokens; the file is damaged, rerun `saepipe tokenize`")
    if matching is not None and cache.attrs.get("tokenizer_fingerprint") != matching.get("tokenizer_fingerprint"):
        raise UserError(f"{path} does not match the activation cache's tokenizer; "
                        "rerun `saepipe tokenize` and `saepipe activations`")
    return cache

