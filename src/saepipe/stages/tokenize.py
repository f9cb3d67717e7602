"""Stage `tokenize`: texts.json -> data/tokens.h5 with the base model's tokenizer."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from tqdm import tqdm

from saepipe import paths
from saepipe.config import Params
from saepipe.corpus.texts import load_texts
from saepipe.corpus.tokens import VALIDATION, split_documents, write_token_cache
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from saepipe.text import count

BATCH_DOCUMENTS = 256


def tokenize_documents(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids per document, without special tokens (windows add BOS themselves when asked to)."""
    documents = []
    with tqdm(total=len(texts), desc="tokenize", unit="doc") as bar:
        for start in range(0, len(texts), BATCH_DOCUMENTS):
            batch = texts[start : start + BATCH_DOCUMENTS]
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            documents.extend(np.asarray(i, dtype=np.int32) for i in ids)
            bar.update(len(batch))
    return documents


def run(params: Params) -> None:
    cfg = params.tokenize
    started = time.perf_counter()
    texts_path = paths.texts_file(params)
    texts = load_texts(texts_path)
    model_dir = params.base_model.output_dir
    tokenizer = load_tokenizer(model_dir)
    documents = tokenize_documents(tokenizer, texts)
    if not any(len(doc) >= 2 for doc in documents):
        raise UserError(f"{texts_path}: no document has two tokens or more, and a document's first token is never "
                        "cached; raise process.min_words or add longer texts")
    split = split_documents(len(documents), cfg.val_fraction, cfg.seed)
    if not (split == VALIDATION).any():
        raise UserError(f"tokenize.val_fraction={cfg.val_fraction:g}: {texts_path} holds {len(documents)} "
                        "document, which leaves the validation split empty; at least 2 documents are needed")
    texts_digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()
    cache = write_token_cache(
        cfg.output,
        documents,
        split,
        {
            "tokenizer_name": params.base_model.model_name,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "bos_token_id": -1 if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "texts_sha256": texts_digest,
        },
    )
    lengths = cache.lengths()
    val_tokens = int(lengths[split == VALIDATION].sum())
    print(
        f"tokenize: {count(cache.n_documents, 'document')}, {count(len(cache.tokens), 'token')} "
        f"(validation: {count(int((split == VALIDATION).sum()), 'document')}, {count(val_tokens, 'token')}; "
        f"median document {int(np.median(lengths)) if len(lengths) else 0} tokens) -> {cfg.output} "
        f"[{time.perf_counter() - started:.1f} s]"
    )
