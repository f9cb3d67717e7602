"""Stage `activations`: token cache + base model -> the hook's activations in HDF5."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saepipe.activations.cache import ActivationCacheWriter
from saepipe.activations.extract import WindowBatch, extract
from saepipe.activations.windows import WindowPlan, batch_windows, padding_fraction, plan_windows, sample_documents
from saepipe.config import ActivationsConfig, Params
from saepipe.corpus.tokens import TRAIN, VALIDATION, TokenCache, read_token_cache
from saepipe.errors import UserError, field_error
from saepipe.model.hooks import block_hook_names, resolve_hook
from saepipe.model.loading import check_4bit, load_hooked_model, resolve_device
from saepipe.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from saepipe.storage import write_json

CACHE_FILE = "activations.h5"
STATS_FILE = "stats.json"


def split_sink(writer: ActivationCacheWriter, doc_split: np.ndarray) -> Callable[[torch.Tensor, WindowBatch], None]:
    """Route each batch's rows to the train or validation group by their document's split."""

    def sink(rows: torch.Tensor, wb: WindowBatch) -> None:
        is_val = doc_split[wb.doc_ids] == VALIDATION
        for split, mask in (("train", ~is_val), ("validation", is_val)):
            if mask.any():
                select = torch.from_numpy(mask)
                writer.append(split, rows[select], wb.token_ids[mask], wb.doc_ids[mask], wb.positions[mask])

    return sink


def plan_documents(tokens: TokenCache, cfg: ActivationsConfig, tokens_path: str) -> WindowPlan:
    """Windows over every document, or over the seeded `max_tokens` sample; both splits must keep a row."""
    plan = plan_windows(tokens.lengths(), cfg.max_text_length - int(cfg.prepend_bos), cfg.overlap(),
                        cfg.prepend_bos)
    doc_rows = plan.document_rows(tokens.n_documents)
    if cfg.max_tokens is not None:
        plan = plan.select(np.isin(plan.doc, sample_documents(doc_rows, tokens.split, cfg.max_tokens, cfg.seed)))
    for value, name in ((TRAIN, "train"), (VALIDATION, "validation")):
        if not doc_rows[tokens.split == value].any():
            raise UserError(f"{tokens_path}: no {name} document is long enough to cache a row "
                            f"(tokenize.val_fraction={tokens.attrs['val_fraction']:g}); "
                            "change the split or add longer documents")
    return plan


def run(params: Params) -> None:
    cfg = params.activations
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.load_in_4bit:
        check_4bit(device)
    tokens = read_token_cache(params.tokenize.output)
    model_dir = params.base_model.output_dir
    tokenizer = load_tokenizer(model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if tokens.attrs["tokenizer_fingerprint"] != fingerprint:
        raise UserError(f"{params.tokenize.output} was tokenized with a different tokenizer "
                        f"({tokens.attrs['tokenizer_name']}) than the model in {model_dir}; "
                        "rerun `saepipe tokenize`")
    bos_id = None
    if cfg.prepend_bos:
        if tokenizer.bos_token_id is None:
            raise field_error("activations.prepend_bos", True, "false: this tokenizer has no BOS token")
        bos_id = int(tokenizer.bos_token_id)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    model = load_hooked_model(model_dir, device=device, dtype=cfg.forward_dtype, load_in_4bit=cfg.load_in_4bit)
    n_layers, d_model, n_ctx = model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx
    hook = resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, n_layers,
                        block_hook_names(model.hook_dict))
    if n_ctx and cfg.max_text_length > n_ctx:
        raise field_error("activations.max_text_length", cfg.max_text_length,
                          f"at most the model's context length {n_ctx}")

    plan = plan_documents(tokens, cfg, params.tokenize.output)
    model_lengths = plan.length + int(cfg.prepend_bos)
    budget = cfg.activation_batch_size * cfg.max_text_length
    batches = batch_windows(model_lengths, budget)
    attrs = {
        "model_name": params.base_model.model_name,
        "model_dir": str(model_dir),
        "hook_layer": hook.layer,
        "hook_name": hook.name,
        "hook_spec": hook.full_name,
        "n_layers": n_layers,
        "tokenizer_name": tokens.attrs["tokenizer_name"],
        "tokenizer_fingerprint": fingerprint,
        "prepend_bos": cfg.prepend_bos,
        "bos_token_id": -1 if bos_id is None else bos_id,
        "max_text_length": cfg.max_text_length,
        "context_overlap": cfg.overlap(),
        "forward_dtype": cfg.forward_dtype,
        "windows": len(plan),
        "documents": len(np.unique(plan.doc)),
        "max_tokens": -1 if cfg.max_tokens is None else cfg.max_tokens,
        "sample_seed": cfg.seed,
        "batch_token_budget": budget,
        "model_tokens": int(model_lengths.sum()),
        "cached_rows": plan.cached_rows,
        "recompute_factor": int(model_lengths.sum()) / plan.cached_rows,
        "padding_fraction": padding_fraction(model_lengths, batches),
    }
    out_dir = Path(cfg.output_dir)
    writer = ActivationCacheWriter(out_dir / CACHE_FILE, d_model, cfg.storage_dtype, cfg.outlier_factor, attrs)

    sink = split_sink(writer, tokens.split)
    forward_started = time.perf_counter()
    try:
        model_tokens = extract(model, hook, plan, batches, tokens, bos_id, pad_id, device, sink)
        forward_seconds = time.perf_counter() - forward_started
        summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    stats = {
        "hook_spec": hook.full_name,
        "d_model": d_model,
        **{k: attrs[k] for k in ("windows", "documents", "model_tokens", "cached_rows", "recompute_factor",
                                 "padding_fraction")},
        "max_tokens": cfg.max_tokens,
        "forward_passes": len(batches),  # extract() runs the model once per batch
        "tokens_per_second": model_tokens / forward_seconds,
        **summary,
        "storage_dtype": cfg.storage_dtype,
        "forward_dtype": cfg.forward_dtype,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / STATS_FILE, stats)
    size = (out_dir / CACHE_FILE).stat().st_size
    outliers = summary["train"]["outliers"] + summary["validation"]["outliers"]
    print(
        f"activations: {hook.full_name}, {summary['train']['rows']:,} train + "
        f"{summary['validation']['rows']:,} validation rows x {d_model} from {attrs['documents']:,}"
        f"{'' if cfg.max_tokens is None else ' sampled'} of {tokens.n_documents:,} documents ({cfg.storage_dtype}, "
        f"{size / 2**20:,.0f} MiB); {outliers} outlier rows above {summary['outlier_threshold']:.4g} "
        f"(= {cfg.outlier_factor:g} x median norm {summary['median_norm']:.4g}); "
        f"{len(batches):,} forward passes, {stats['tokens_per_second']:,.0f} tok/s, "
        f"recompute x{attrs['recompute_factor']:.2f} "
        f"-> {out_dir / CACHE_FILE} [{stats['seconds']:.0f} s]"
    )


