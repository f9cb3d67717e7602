"""Stage `activation-db`: the evaluated SAE + the activation cache -> <analysis>/activation_db.h5 (no model run)."""

from __future__ import annotations

import time

from saepipe.activations.cache import ActivationCache, sae_hook
from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import sae_weights_sha256
from saepipe.analysis.db_build import build_activation_db, encode_batch_limit
from saepipe.config import Params
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError, field_error
from saepipe.model.loading import resolve_device
from saepipe.paths import activation_cache, activation_db, evaluated_sae
from saepipe.sae.formats import check_compatible, load_sae
from saepipe.text import count
from saepipe.version import VERSION


@names_run
def run(params: Params) -> None:
    cfg = params.activation_db
    started = time.perf_counter()
    sae_path = evaluated_sae(params)
    sae = load_sae(sae_path, resolve_device(cfg.device, "activation_db.device"))
    limit = encode_batch_limit(sae.d_in, sae.d_sae, cfg.max_memory_mb)
    if cfg.batch_size > limit:
        raise field_error("activation_db.batch_size", cfg.batch_size,
                          f"a batch that fits activation_db.max_memory_mb={cfg.max_memory_mb}: at most {limit:,} "
                          f"rows with this SAE (d_in {sae.d_in}, d_sae {sae.d_sae:,}); lower it or raise "
                          "max_memory_mb")
    cache_path = activation_cache(params)
    out = activation_db(params)
    with ActivationCache(cache_path, hook=sae_hook(sae), strict=False) as cache:
        attrs = cache.attrs
        check_compatible(sae, d_model=cache.d_model, hook=attrs["hook"], model_name=attrs["model_name"],
                         against=f"the activation cache {cache_path}")
        tokens = read_token_cache(params.tokenize.output, matching=attrs)
        if sum(cache.n_rows(s) for s in cfg.splits) == 0:
            raise UserError(f"activation_db.splits={cfg.splits}: {cache_path} holds no rows of these splits")
        result = build_activation_db(
            out, sae, cache, cfg.splits, n_documents=tokens.n_documents, values_dtype=cfg.values_dtype,
            quantiles=cfg.quantiles, batch_size=cfg.batch_size, max_memory_mb=cfg.max_memory_mb,
            include_outliers=cfg.include_outliers,
            attrs={"sae_path": str(sae_path), "sae_sha256": sae_weights_sha256(sae_path),
                   "sae_type": sae.cfg.sae_type, "model_name": attrs["model_name"],
                   "hook": attrs["hook"], "activation_cache": str(cache_path),
                   "token_cache": str(params.tokenize.output),
                   "tokenizer_fingerprint": attrs["tokenizer_fingerprint"],
                   "texts_sha256": tokens.attrs["texts_sha256"], "saepipe_version": VERSION})
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    print(f"activation-db: {result.n_rows:,} tokens x {sae.d_sae:,} features, {result.nnz:,} activations "
          f"(L0 {result.nnz / max(result.n_rows, 1):.1f}, {cfg.values_dtype}; "
          f"{count(result.outlier_rows, 'outlier row')} "
          f"{'encoded' if cfg.include_outliers else 'left without features'}); encode "
          f"{result.n_rows / max(result.encode_seconds, 1e-9):,.0f} tok/s, reverse index in "
          f"{count(result.blocks, 'block')} -> {out} ({size / 2**20:,.1f} MiB) [{seconds:.1f} s]")
