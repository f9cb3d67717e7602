"""Stage `summarize`: activation DB + matrices + the unembedding -> feature_summaries.jsonl, summary_index.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.summaries import FeatureTables, SummaryOptions, feature_summary, index_entry
from saepipe.config import Params
from saepipe.errors import UserError
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
from saepipe.storage import atomic_path, write_json


def require_topk(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: file not found; run `saepipe matrices` first")


def load_topk(path: Path, keys: tuple[str, ...], d_sae: int) -> tuple[np.ndarray, ...]:
    """Arrays of a matrices-stage top-k file, checked against the SAE's size."""
    require_topk(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = tuple(data[k] for k in keys)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a readable top-k file ({exc}); rerun `saepipe matrices`") from None
    if any(a.shape[0] != d_sae for a in arrays):
        raise UserError(f"{path} holds {arrays[0].shape[0]} features, not the SAE's {d_sae}; rerun `saepipe matrices`")
    return arrays


@names_run
def run(params: Params) -> None:
    cfg = params.summarize
    started = time.perf_counter()
    sae_path = evaluated_sae(params)
    # The inputs' refusals first, before torch is imported and the model loaded (seconds each).
    for name in (SIMILARITY_TOPK, COOCCURRENCE_TOPK):
        require_topk(matrices_dir(params) / name)
    with ActivationDB(activation_db(params)) as db:
        db.check_sae(sae_path)
    import torch

    from saepipe.analysis.logit_lens import logit_effects, unembedding
    from saepipe.model.loading import load_hooked_model
    from saepipe.sae.formats import check_compatible, load_sae

    sae = load_sae(sae_path)
    tokenizer = load_tokenizer(params.base_model.output_dir)
    model = load_hooked_model(params.base_model.output_dir, device=torch.device("cpu"))
    check_compatible(sae, d_model=int(model.cfg.d_model), model_name=params.base_model.model_name,
                     against=f"the model in {params.base_model.output_dir}")
    W_U, scale, center = unembedding(model)
    del model
    promoted_ids, promoted, suppressed_ids, suppressed = logit_effects(sae.W_dec.detach(), W_U, scale, center,
                                                                       cfg.logit_tokens)
    folder = matrices_dir(params)
    tables = FeatureTables(
        promoted=(promoted_ids.numpy(), promoted.numpy()), suppressed=(suppressed_ids.numpy(), suppressed.numpy()),
        nearest=load_topk(folder / SIMILARITY_TOPK, ("ids", "values"), sae.d_sae),
        cooccurring=load_topk(folder / COOCCURRENCE_TOPK, ("ids", "jaccard", "counts"), sae.d_sae))
    options = SummaryOptions(top_k=cfg.top_k, context=(cfg.context_before, cfg.context_after),
                             quantile_bands=cfg.quantile_bands, quantile_examples=cfg.quantile_examples,
                             top_tokens=cfg.top_tokens, neighbours=cfg.neighbours)
    out_dir = analysis_dir(params)
    index = []
    with ActivationDB(activation_db(params), tokens=params.tokenize.output, tokenizer=tokenizer) as db:
        db.check_sae(sae_path)
        with atomic_path(out_dir / SUMMARIES) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for f in tqdm(range(sae.d_sae), desc="summarize", unit="feature"):
                summary = feature_summary(db, f, options, tables)
                handle.write(json.dumps(summary, ensure_ascii=False) + "\n")
                index.append(index_entry(summary, cfg.index_tokens))
    write_json(out_dir / SUMMARY_INDEX, index)
    alive = sum(1 for entry in index if entry["density"] > 0)
    size = (out_dir / SUMMARIES).stat().st_size
    print(f"summarize: {sae.d_sae:,} features ({alive:,} alive), {cfg.top_k} top examples each -> "
          f"{out_dir / SUMMARIES} ({size / 2**20:,.1f} MiB), {out_dir / SUMMARY_INDEX} "
          f"[{time.perf_counter() - started:.1f} s]")
