"""Throughput of the `activations` stage against a bare forward pass of the same model.

ratio = the stage's model tokens/s (its extract loop: batching, hooks, bookkeeping, HDF5 writes,
        finalising the cache) ÷ a bare forward's tokens/s (same model object stopped at the same layer,
        same padded batches, timed batch by batch in alternating order in the same run).
Goal: >= 0.9. Also prints the overlap's recomputation (model tokens ÷ cached rows) for the whole corpus.
Each forward dtype gets a JSON line; the last line is the default dtype's (params.yaml).

Needs `models/base` (`dvc repro base-model`); uses `data/tokens.h5` when present, else tokenizes the
repo's default corpus into a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.activations.cache import ActivationCacheWriter  # noqa: E402
from saepipe.activations.extract import extract, iter_window_batches  # noqa: E402
from saepipe.activations.windows import batch_windows, padding_fraction, plan_windows  # noqa: E402
from saepipe.config import Params, load_params, replace_values  # noqa: E402
from saepipe.corpus.tokens import read_token_cache  # noqa: E402
from saepipe.model.hooks import block_hook_names, resolve_hook  # noqa: E402
from saepipe.model.loading import load_hooked_model, resolve_device  # noqa: E402
from saepipe.stages.activations import split_sink  # noqa: E402


def replace(params: Params, section: str, **changes) -> Params:
    return dataclasses.replace(params, **{section: replace_values(getattr(params, section), **changes)})


def ensure_tokens(params: Params, workdir: Path) -> Params:
    if Path(params.tokenize.output).is_file():
        return params
    from saepipe.stages import process, tokenize

    params = replace(params, "process", output_dir=str(workdir / "processed"))
    params = replace(params, "tokenize", output=str(workdir / "tokens.h5"))
    process.run(params)
    tokenize.run(params)
    return params


def paired_rates(params: Params, device: torch.device, workdir: Path) -> dict:
    """Per batch, in alternating order: a bare forward, then the stage's own loop (extract + writer).

    Pairing each batch cancels the machine's drift; the stage side also pays for finalising the
    cache (outlier flags, statistics, rename), spread over its batches.
    """
    cfg = params.activations
    tokens = read_token_cache(params.tokenize.output)
    model = load_hooked_model(params.base_model.output_dir, device=device, dtype=cfg.forward_dtype)
    hook = resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, model.cfg.n_layers,
                        block_hook_names(model.hook_dict))
    bos = int(cfg.prepend_bos)
    bos_id = model.tokenizer.bos_token_id if cfg.prepend_bos else None
    plan = plan_windows(tokens.lengths(), cfg.max_text_length - bos, cfg.overlap(), cfg.prepend_bos, cfg.max_tokens)
    model_lengths = plan.length + bos
    batches = batch_windows(model_lengths, cfg.activation_batch_size * cfg.max_text_length)
    writer = ActivationCacheWriter(workdir / f"bench_{cfg.forward_dtype}.h5", model.cfg.d_model, cfg.storage_dtype,
                                   cfg.outlier_factor, {})
    sink = split_sink(writer, tokens.split)
    bare_seconds = stage_seconds = 0.0
    model_tokens = 0
    with torch.inference_mode():
        model(next(iter_window_batches(plan, batches[:1], tokens, bos_id, 0)).tokens, stop_at_layer=1)  # warm-up
        for i, batch in enumerate(batches):
            for side in ("bare", "stage") if i % 2 == 0 else ("stage", "bare"):
                started = time.perf_counter()
                if side == "bare":
                    wb = next(iter_window_batches(plan, [batch], tokens, bos_id, 0))
                    started = time.perf_counter()  # the baseline gets its input for free
                    model(wb.tokens.to(device), stop_at_layer=hook.stop_at_layer)
                    bare_seconds += time.perf_counter() - started
                else:
                    model_tokens += extract(model, hook, plan, [batch], tokens, bos_id, 0, device, sink, progress=False)
                    stage_seconds += time.perf_counter() - started
        started = time.perf_counter()
        writer.close()
        stage_seconds += time.perf_counter() - started
    return {
        "stage": model_tokens / stage_seconds,
        "bare": model_tokens / bare_seconds,
        "model_tokens": model_tokens,
        "cached_rows": plan.cached_rows,
        "batches": len(batches),
        "padding_fraction": padding_fraction(model_lengths, batches),
        "hook": hook.full_name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--rows", type=int, default=16_000, help="cached rows per timed run (whole documents)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="forward dtypes to time")
    args = parser.parse_args()

    params = load_params(args.params)
    device = resolve_device(params.activations.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        params = ensure_tokens(params, workdir)
        full_plan = plan_windows(read_token_cache(params.tokenize.output).lengths(),
                                 params.activations.max_text_length - int(params.activations.prepend_bos),
                                 params.activations.overlap(), params.activations.prepend_bos)
        recompute = full_plan.model_tokens / full_plan.cached_rows
        print(json.dumps({"figure": "overlap_recomputation", "model_tokens": full_plan.model_tokens,
                          "cached_rows": full_plan.cached_rows, "recompute_factor": round(recompute, 4)}))
        default_dtype = params.activations.forward_dtype
        order = [d for d in args.dtypes if d != default_dtype] + [default_dtype]
        for dtype in order:
            run = replace(params, "activations", forward_dtype=dtype, max_tokens=args.rows)
            r = paired_rates(run, device, workdir)
            print(json.dumps({
                "benchmark": f"activations_stage_{dtype}",
                "value": round(r["stage"], 1),
                "unit": "tokens/s",
                "baseline": f"bare forward of the same model to {r['hook']} on the same batches ({dtype})",
                "baseline_value": round(r["bare"], 1),
                "ratio": round(r["stage"] / r["bare"], 4),
                "goal": ">= 0.9",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "model_tokens": r["model_tokens"],
                "cached_rows": r["cached_rows"],
                "recompute_factor": round(r["model_tokens"] / r["cached_rows"], 4),
                "batches": r["batches"],
                "padding_fraction": round(r["padding_fraction"], 4),
            }), flush=True)


if __name__ == "__main__":
    main()
