"""Stage `summarize`: activation DB + matrices + the unembedding -> feature_summaries.jsonl, summary_index.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.summaries import FeatureTables, SummaryOptions, feature_summary, index_entry
from saepipe.config import Params
from saepipe.errors import UserError, field_error
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import (
    COOCCURRENCE_TOPK,
    SIMILARITY_TOPK,
    SUMMARIES,
    SUMMARY_INDEX,
    activation_db,
    analysis_dir,
    evaluated_sae,
    matrices_dir,
)
from saepipe.storage import atomic_path, read_npz, write_json

if TYPE_CHECKING:
    from saepipe.sae import SparseAutoencoder


def load_topk(path: Path, keys: tuple[str, ...], d_sae: int) -> tuple[np.ndarray, ...]:
    """Arrays of a matrices-stage top-k file, checked against the SAE's size."""
    arrays = tuple(read_npz(path, keys, "matrices").values())
    if arrays[0].ndim != 2 or any(a.shape[:1] != (d_sae,) for a in arrays):
        raise UserError(f"{path} holds {arrays[0].shape[:1]} features, not the SAE's {d_sae}; "
                        "rerun `saepipe matrices`")
    return arrays


@names_run
def run(params: Params) -> None:
    cfg = params.summarize
    started = time.perf_counter()
    sae_path = evaluated_sae(params)
    # every input checked and read before torch is imported and the model loaded (seconds, then a minute)
    with ActivationDB(activation_db(params)) as db:
        db.check_sae(sae_path)
        d_sae = db.d_sae
    folder = matrices_dir(params)
    nearest = load_topk(folder / SIMILARITY_TOPK, ("ids", "values"), d_sae)
    cooccurring = load_topk(folder / COOCCURRENCE_TOPK, ("ids", "jaccard", "counts"), d_sae)
    k = min(nearest[0].shape[1], cooccurring[0].shape[1])
    if cfg.neighbours > k:
        raise field_error("summarize.neighbours", cfg.neighbours,
                          f"at most the {k} neighbours per feature of {folder} (matrices.top_k when it was made)")
    from saepipe.sae.formats import load_sae

    sae = load_sae(sae_path)
    with ActivationDB(activation_db(params), tokens=params.tokenize.output) as db:
        db.tokenizer = load_tokenizer(params.base_model.output_dir)
        index = _summarize(params, sae, db, nearest, cooccurring)
    out_dir = analysis_dir(params)
    write_json(out_dir / SUMMARY_INDEX, index)
    alive = sum(1 for entry in index if entry["density"] > 0)
    size = (out_dir / SUMMARIES).stat().st_size
    print(f"summarize: {sae.d_sae:,} features ({alive:,} alive), {cfg.top_k} top examples each -> "
          f"{out_dir / SUMMARIES} ({size / 2**20:,.1f} MiB), {out_dir / SUMMARY_INDEX} "
          f"[{time.perf_counter() - started:.1f} s]")


def _summarize(params: Params, sae: SparseAutoencoder, db: ActivationDB, nearest: tuple[np.ndarray, ...],
               cooccurring: tuple[np.ndarray, ...]) -> list[dict[str, Any]]:
    """Write feature_summaries.jsonl; returns the index entries."""
    import torch

    from saepipe.analysis.logit_lens import logit_effects, unembedding
    from saepipe.model.loading import load_hooked_model
    from saepipe.sae.formats import check_compatible

    cfg = params.summarize
    model = load_hooked_model(params.base_model.output_dir, device=torch.device("cpu"))
    check_compatible(sae, d_model=int(model.cfg.d_model), model_name=params.base_model.model_name,
                     against=f"the model in {params.base_model.output_dir}")
    W_U, scale, center = unembedding(model)
    del model
    promoted_ids, promoted, suppressed_ids, suppressed = logit_effects(sae.W_dec.detach(), W_U, scale, center,
                                                                       cfg.logit_tokens)
    tables = FeatureTables(
        promoted=(promoted_ids.numpy(), promoted.numpy()), suppressed=(suppressed_ids.numpy(), suppressed.numpy()),
        nearest=nearest, cooccurring=cooccurring)
    options = SummaryOptions(top_k=cfg.top_k, context=(cfg.context_before, cfg.context_after),
                             quantile_bands=cfg.quantile_bands, quantile_examples=cfg.quantile_examples,
                             top_tokens=cfg.top_tokens, neighbours=cfg.neighbours)
    index = []
    with atomic_path(analysis_dir(params) / SUMMARIES) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for f in tqdm(range(sae.d_sae), desc="summarize", unit="feature"):
            summary = feature_summary(db, f, options, tables)
            handle.write(json.dumps(summary, ensure_ascii=False) + "\n")
            index.append(index_entry(summary, cfg.index_tokens))
    return index
