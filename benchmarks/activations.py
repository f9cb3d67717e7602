"""Throughput of the `activations` stage against a bare forward pass of the same model.

ratio = the stage's model tokens/s (its extract loop: batching, hooks, bookkeeping, HDF5 writes)
        ÷ a bare forward's tokens/s (same model stopped at the same layer, same padded batches, same run).
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

from saepipe.activations.extract import iter_window_batches  # noqa: E402
from saepipe.activations.windows import batch_windows, plan_windows  # noqa: E402
from saepipe.config import SECTIONS, Params, build_section, load_params  # noqa: E402
from saepipe.corpus.tokens import read_token_cache  # noqa: E402
from saepipe.model.hooks import block_hook_names, resolve_hook  # noqa: E402
from saepipe.model.loading import load_hooked_model, resolve_device  # noqa: E402
from saepipe.stages import activations as activations_stage  # noqa: E402


def replace(params: Params, section: str, **changes) -> Params:
    values = {**dataclasses.asdict(getattr(params, section)), **changes}
    return dataclasses.replace(params, **{section: build_section(section, SECTIONS[section], values)})


def ensure_tokens(params: Params, workdir: Path) -> Params:
    if Path(params.tokenize.output).is_file():
        return params
    from saepipe.stages import process, tokenize

    params = replace(params, "process", output_dir=str(workdir / "processed"))
    params = replace(params, "tokenize", output=str(workdir / "tokens.h5"))
    process.run(params)
    tokenize.run(params)
    return params


def bare_forward_rate(params: Params, device: torch.device) -> float:
    """Tokens/s of the model alone over the stage's own padded batches (inputs built beforehand)."""
    cfg = params.activations
    tokens = read_token_cache(params.tokenize.output)
    model = load_hooked_model(params.base_model.output_dir, device=device, dtype=cfg.forward_dtype)
    hook = resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, model.cfg.n_layers,
                        block_hook_names(model.hook_dict))
    bos = int(cfg.prepend_bos)
    plan = plan_windows(tokens.lengths(), cfg.max_text_length - bos, cfg.overlap(), cfg.prepend_bos, cfg.max_tokens)
    batches = batch_windows(plan.length + bos, cfg.activation_batch_size * cfg.max_text_length)
    bos_id = model.tokenizer.bos_token_id if cfg.prepend_bos else None
    inputs = [(wb.tokens.to(device), wb.model_tokens) for wb in iter_window_batches(plan, batches, tokens, bos_id, 0)]
    with torch.inference_mode():
        started = time.perf_counter()
        for batch, _ in inputs:
            model(batch, stop_at_layer=hook.stop_at_layer)
        seconds = time.perf_counter() - started
    return sum(n for _, n in inputs) / seconds


def stage_rate(params: Params) -> tuple[float, dict]:
    activations_stage.run(params)
    stats = json.loads((Path(params.activations.output_dir) / "stats.json").read_text())
    return stats["tokens_per_second"], stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--rows", type=int, default=16_000, help="cached rows per timed run (whole documents)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best counts")
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
            run = replace(params, "activations", forward_dtype=dtype, max_tokens=args.rows,
                          output_dir=str(workdir / f"acts_{dtype}"))
            bare, stage, stats = [], [], {}
            for _ in range(args.repeats):
                bare.append(bare_forward_rate(run, device))
                rate, stats = stage_rate(run)
                stage.append(rate)
            ratio = max(stage) / max(bare)
            print(json.dumps({
                "benchmark": f"activations_stage_{dtype}",
                "value": round(max(stage), 1),
                "unit": "tokens/s",
                "baseline": f"bare forward of the same model to {stats['hook_spec']} on the same batches ({dtype})",
                "baseline_value": round(max(bare), 1),
                "ratio": round(ratio, 4),
                "goal": ">= 0.9",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "model_tokens": stats["model_tokens"],
                "cached_rows": stats["cached_rows"],
                "recompute_factor": round(stats["recompute_factor"], 4),
                "padding_fraction": round(stats["padding_fraction"], 4),
                "runs": {"stage": [round(r, 1) for r in stage], "bare": [round(r, 1) for r in bare]},
            }))


if __name__ == "__main__":
    main()
