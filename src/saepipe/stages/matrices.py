"""Stage `matrices`: the evaluated SAE + its activation DB -> feature x feature matrices.

Writes `<evaluate.output_dir>/<SAE folder>/matrices/` in one piece (a temporary directory renamed when complete):

    feature_similarity.npy             float32 [d_sae, d_sae]: decoder cosine (only when d_sae <= dense_max_features)
    feature_cooccurrence.npy           int64 [d_sae, d_sae]: tokens on which both features fire (same rule)
    feature_cooccurrence_jaccard.npy   float32 [d_sae, d_sae]: the Jaccard form of those counts (same rule)
    similarity_topk.npz                ids int64, values float32 [d_sae, k]: nearest features by decoder cosine
    cooccurrence_topk.npz              ids int64, jaccard float32, counts int64 [d_sae, k] (-1 padding);
                                       fire_counts int64 [d_sae]
    metadata.json                      what each file holds, the formulas, the SAE and DB read

and beside it (outside the DVC out on purpose) `matrices_metrics.json` (DVC metrics) and
`decoder_similarity_histogram.json` (a DVC plot: x max_cosine, y features).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.activations.run_name import names_run
from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.paths import (
    COOCCURRENCE,
    COOCCURRENCE_TOPK,
    JACCARD,
    MATRICES_METADATA,
    MATRICES_METRICS,
    SIMILARITY,
    SIMILARITY_HISTOGRAM,
    SIMILARITY_TOPK,
    activation_db,
    analysis_dir,
    evaluated_sae,
    matrices_dir,
)
from saepipe.storage import atomic_dir, write_json

FILES = {
    SIMILARITY: "float32 [d_sae, d_sae]: cosine between decoder rows (W_dec[i], W_dec[j]); diagonal 1, 0 for "
                "zero-norm rows",
    COOCCURRENCE: "int64 [d_sae, d_sae]: C[i, j], tokens on which features i and j both fire (activation > 0); "
                  "the diagonal is each feature's fire count",
    JACCARD: "float32 [d_sae, d_sae]: J[i, j] (see jaccard_formula)",
    SIMILARITY_TOPK: "ids int64 [d_sae, k], values float32 [d_sae, k]: each feature's k nearest other features by "
                     "decoder cosine, nearest first",
    COOCCURRENCE_TOPK: "ids int64, jaccard float32, counts int64 [d_sae, k]: each feature's k top co-occurring "
                       "other features by Jaccard (ties by id), only pairs that fire together, padded with id -1, "
                       "jaccard 0, count 0; fire_counts int64 [d_sae]: tokens each feature fires on",
}
DENSE_FILES = (SIMILARITY, COOCCURRENCE, JACCARD)


@names_run
def run(params: Params) -> None:
    from saepipe.analysis.activation_db import ActivationDB

    cfg = params.matrices
    started = time.perf_counter()
    path = evaluated_sae(params)
    db_path = activation_db(params)
    with ActivationDB(db_path) as db:  # the inputs' refusals before torch is imported (seconds)
        db.check_sae(path)
    from saepipe.analysis import matrices
    from saepipe.sae.formats import load_sae

    sae = load_sae(path)
    out_dir = matrices_dir(params)
    d_sae = sae.d_sae
    dense = d_sae <= cfg.dense_max_features
    with ActivationDB(db_path) as db:
        if db.d_sae != d_sae:
            raise UserError(f"{db_path} holds {db.d_sae:,} features, the SAE at {path} has {d_sae:,}; "
                            "rerun `saepipe activation-db`")
        attrs, n_rows = dict(db.attrs), db.n_rows
        with atomic_dir(out_dir) as tmp:
            sim_out = _dense_file(tmp / SIMILARITY, np.float32, d_sae, dense)
            similarity = matrices.decoder_similarity(sae.W_dec, cfg.top_k, cfg.block_size, cfg.similarity_threshold,
                                                     dense_out=sim_out, progress=True)
            counts_out = _dense_file(tmp / COOCCURRENCE, np.int64, d_sae, dense)
            jaccard_out = _dense_file(tmp / JACCARD, np.float32, d_sae, dense)
            cooc = matrices.cooccurrence(db.csr_chunks(cfg.chunk_rows), d_sae, cfg.top_k, block_size=cfg.block_size,
                                         dense_out=counts_out, jaccard_out=jaccard_out, progress=True,
                                         total_chunks=math.ceil(n_rows / cfg.chunk_rows))
            for array in (sim_out, counts_out, jaccard_out):
                if array is not None:
                    array.flush()
            del sim_out, counts_out, jaccard_out
            np.savez(tmp / SIMILARITY_TOPK, ids=similarity.ids, values=similarity.values)
            np.savez(tmp / COOCCURRENCE_TOPK, ids=cooc.ids, jaccard=cooc.jaccard, counts=cooc.counts,
                     fire_counts=cooc.fire_counts)
            write_json(tmp / MATRICES_METADATA, metadata(params, path, db_path, attrs, n_rows, d_sae, dense,
                                                similarity.ids.shape[1]))
            for file in tmp.iterdir():
                file.chmod(0o644)

    metrics = matrices.matrices_metrics(similarity, cooc, dense=dense)
    write_json(analysis_dir(params) / MATRICES_METRICS, metrics)
    histogram = matrices.max_cosine_histogram(similarity, cfg.histogram_bins)
    write_json(analysis_dir(params) / SIMILARITY_HISTOGRAM, histogram)
    if not dense:
        print(f"matrices: d_sae {d_sae:,} > matrices.dense_max_features {cfg.dense_max_features:,}: only the top-k "
              f"files were written ({SIMILARITY_TOPK}, {COOCCURRENCE_TOPK}), no dense d_sae x d_sae matrices")
    print(summary(metrics, out_dir, time.perf_counter() - started))


def _dense_file(path: Path, dtype: type, d_sae: int, dense: bool) -> np.ndarray | None:
    """A d_sae x d_sae .npy memory-mapped for writing (the matrices never sit in RAM whole); None when not dense."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(d_sae, d_sae)) if dense else None


def metadata(params: Params, sae_path: Path, db_path: Path, attrs: dict[str, Any], n_rows: int, d_sae: int,
             dense: bool, k: int) -> dict[str, Any]:
    from saepipe.analysis.matrices import JACCARD_FORMULA

    files = {name: what for name, what in FILES.items() if dense or name not in DENSE_FILES}
    return {
        "files": files,
        "dense": dense,
        "d_sae": d_sae,
        "top_k": k,
        "n_rows": n_rows,
        "fires": "a feature fires on a token when its activation is > 0",
        "cosine_formula": "W_dec[i] . W_dec[j] / (|W_dec[i]| |W_dec[j]|), 0 where either norm is 0",
        "jaccard_formula": JACCARD_FORMULA,
        "histogram": f"each feature's max cosine to any other (zero-norm decoder rows left out), "
                     f"{params.matrices.histogram_bins} bins over [-1, 1]",
        "sae_path": str(sae_path),
        "sae_sha256": attrs.get("sae_sha256"),
        "activation_db": str(db_path),
        "activation_db_sae_path": attrs.get("sae_path"),
        "params": {"top_k": params.matrices.top_k, "dense_max_features": params.matrices.dense_max_features,
                   "similarity_threshold": params.matrices.similarity_threshold},
    }


def summary(metrics: dict[str, Any], out_dir: Path, seconds: float) -> str:
    co = metrics["cooccurrence"]
    return (f"matrices: d_sae {metrics['d_sae']:,}: mean max-cosine {metrics['mean_max_cosine']:.3f}, "
            f"{metrics['pairs_above_threshold']:,} pairs above {metrics['similarity_threshold']:g} "
            f"({metrics['features_with_near_duplicate']:,} features); co-occurrence over {co['tokens']:,} tokens, "
            f"mean top-1 Jaccard {co['mean_jaccard_top1']:.3f}{'' if metrics['dense'] else ' (top-k only)'} "
            f"-> {out_dir} [{seconds:.0f} s]")
