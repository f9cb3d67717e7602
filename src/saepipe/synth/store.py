"""A synthetic setting on disk: the rows as an ordinary activation cache, the truth beside them.

    <out>/activations.h5      the activation cache (written by `activations.cache`, its one writer), so
                              `saepipe train` with activations.output_dir=<out> trains on it unchanged
    <out>/truth.safetensors   the truth's tensors (`Truth.TENSORS`)
    <out>/truth.json          format, the setting (`SynthConfig`), the truth's fingerprint, row statistics

The cache marks itself synthetic: model_name `synthetic/<name>`, hook `blocks.0.hook_synthetic`,
tokenizer_fingerprint `synthetic:<truth fingerprint>` (the check that a cache or an SAE belongs to this
truth), `synthetic` = 1. Each row's token_id is its strongest true feature (0 for a row where none fires),
so a token-keyed view of the cache reads as the truth; doc_ids / positions count blocks of `doc_rows` rows.
Every file is written atomically; the truth first, the cache last.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from saepipe.activations.cache import ActivationCacheWriter
from saepipe.errors import UserError
from saepipe.model.hooks import HookSpec
from saepipe.paths import ACTIVATION_CACHE
from saepipe.storage import atomic_path, read_json, write_json
from saepipe.synth.generate import SynthConfig, Truth

TRUTH_TENSORS = "truth.safetensors"
TRUTH_JSON = "truth.json"
FORMAT = "saepipe.synth_truth"
FORMAT_VERSION = 1
HOOK = HookSpec(0, "hook_synthetic")
NO_OUTLIERS = 1e6
"""The cache's outlier_factor: synthetic rows have no massive-activation outliers to leave out."""
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def fingerprint_attr(truth: Truth) -> str:
    return f"synthetic:{truth.fingerprint()}"


def cache_attrs(truth: Truth) -> dict[str, Any]:
    """The cache attributes a language-model cache has, filled for synthetic rows (what train and export read)."""
    cfg = truth.config
    splits = cfg.split_rows()
    return {
        "model_name": f"synthetic/{cfg.name}",
        "model_dir": "",
        "synthetic": 1,
        "hook": HOOK.full_name,
        "n_layers": 1,
        "tokenizer_name": "none (synthetic rows)",
        "tokenizer_fingerprint": fingerprint_attr(truth),
        "prepend_bos": False,
        "bos_token_id": -1,
        "max_text_length": cfg.doc_rows,
        "context_overlap": 0,
        "forward_dtype": "float32",
        "windows": -(-cfg.rows // cfg.doc_rows),
        "documents": -(-cfg.rows // cfg.doc_rows),
        "max_tokens": -1,
        "sample_seed": cfg.seed,
        "model_tokens": cfg.rows,
        "cached_rows": splits["train"] + splits["validation"],
        "recompute_factor": 1.0,
        "padding_fraction": 0.0,
    }


def write_synthetic(cfg: SynthConfig, out_dir: str | Path, storage_dtype: str = "float32", progress: bool = True
                    ) -> dict[str, Any]:
    """Draw the setting's truth and rows into `out_dir`; returns the summary also kept in truth.json."""
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype={storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    started = time.perf_counter()
    truth = Truth.build(cfg)
    out_dir = Path(out_dir)
    splits = cfg.split_rows()
    writer_attrs = cache_attrs(truth)
    with atomic_path(out_dir / TRUTH_TENSORS) as tmp:
        save_file(truth.tensors(), str(tmp))
    fingerprint = truth.fingerprint()
    write_json(out_dir / TRUTH_JSON, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                      "config": dataclasses.asdict(cfg), "fingerprint": fingerprint,
                                      "complete": False})
    writer = ActivationCacheWriter(out_dir / ACTIVATION_CACHE, cfg.d_in, storage_dtype, NO_OUTLIERS, writer_attrs)
    active = 0
    row = 0
    try:
        with tqdm(total=cfg.rows, desc="synth", unit="row", unit_scale=True, disable=not progress) as bar:
            for split, n_rows in splits.items():
                for x, codes in truth.rows(split, n_rows):
                    fired = codes > 0
                    active += int(fired.sum())
                    strongest = torch.where(fired.any(1), codes.argmax(1), 0).numpy().astype(np.int32)
                    index = np.arange(row, row + len(x))
                    writer.append(split, x, strongest, (index // cfg.doc_rows).astype(np.int32),
                                  (index % cfg.doc_rows).astype(np.int32))
                    row += len(x)
                    bar.update(len(x))
        cache_summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    summary = {
        "rows": row,
        "train_rows": splits["train"],
        "validation_rows": splits["validation"],
        "mean_active_per_row": active / row,
        "children": int((truth.parents >= 0).sum()),
        "median_norm": cache_summary["median_norm"],
        "outliers": cache_summary["train"]["outliers"] + cache_summary["validation"]["outliers"],
        "storage_dtype": storage_dtype,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / TRUTH_JSON, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                      "config": dataclasses.asdict(cfg), "fingerprint": fingerprint,
                                      "complete": True, "summary": summary})
    return summary


def read_truth(truth_dir: str | Path) -> Truth:
    """The truth written by `write_synthetic` into `truth_dir`, checked against its fingerprint."""
    truth_dir = Path(truth_dir)
    meta_path, tensors_path = truth_dir / TRUTH_JSON, truth_dir / TRUTH_TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise UserError(f"--truth={truth_dir}: expected a folder written by `saepipe synth generate` "
                        f"({TRUTH_JSON} and {TRUTH_TENSORS})")
    meta = read_json(meta_path, "synthetic truth")
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise UserError(f"{meta_path}: not a synthetic truth (format={found!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: truth version {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                        "regenerate it with `saepipe synth generate`")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{tensors_path}: unreadable ({exc}); regenerate it with `saepipe synth generate`") from None
    truth = Truth.from_tensors(SynthConfig.from_dict(meta.get("config") or {}), tensors, tensors_path)
    if truth.fingerprint() != meta.get("fingerprint"):
        raise UserError(f"{tensors_path} does not match {meta_path} (fingerprint differs); regenerate both with "
                        "`saepipe synth generate`")
    return truth
