"""Throughput of the `evaluate` stage's ablation pass against a bare forward pass of the same model.

value    = model positions/s of the ablation pass (`AblationAccumulator.add`: a clean run and four spliced
           ones — SAE, SAE + error, zero, mean — with CE and KL over the vocabulary; the model below the hook
           runs once, see benchmarks/ablation.py)
baseline = model positions/s of one bare forward to the logits, same model object, same padded batches,
           timed batch by batch in alternating order in the same run
ratio    = value / baseline. Five full forwards would make 0.2 the ceiling; goal >= 0.18, i.e. no slower
           than five forwards with ~10% for the splices, the SAE and the metrics (`ratio_per_forward` =
           ratio x 5; above 1 since the pass shares the model below the hook).

Needs `models/base` (`dvc repro base-model`) and `data/tokens.h5` (`dvc repro tokenize`). Uses this run's
exported SAE when there is one (`--sae`), else a random TopK SAE of the default size on the same hook.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.activations.cache import ActivationCache  # noqa: E402
from saepipe.activations.extract import build_batch  # noqa: E402
from saepipe.activations.windows import batch_windows  # noqa: E402
from saepipe.analysis.ablation import AblationAccumulator, ablation_plan, replacements  # noqa: E402
from saepipe.config import load_params  # noqa: E402
from saepipe.corpus.tokens import read_token_cache  # noqa: E402
from saepipe.model.hooks import block_hook_names, resolve_hook  # noqa: E402
from saepipe.model.loading import load_hooked_model, resolve_device  # noqa: E402
from saepipe.sae import build_sae, sae_config  # noqa: E402
from saepipe.sae.formats import load_sae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--tokens", type=int, default=2048, help="scored predictions to time (whole windows)")
    parser.add_argument("--sae", default=None, help="an exported SAE (default: this run's export, if any)")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.activations
    device = resolve_device(params.evaluate.device, "evaluate.device")
    tokens = read_token_cache(params.tokenize.output)
    model = load_hooked_model(params.base_model.output_dir, device=device, dtype=cfg.forward_dtype)
    hook = resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, model.cfg.n_layers,
                        block_hook_names(model.hook_dict))
    sae_dir = Path(args.sae) if args.sae else REPO / params.export.output_dir / params.train.run_name
    if sae_dir.is_dir():
        sae, sae_name = load_sae(sae_dir, device), str(sae_dir)
    else:
        torch.manual_seed(0)
        d = int(model.cfg.d_model)
        sae_cfg = sae_config("topk", d_in=d, d_sae=params.train.sae.sae_expansion * d, k=params.train.sae.topk)
        sae, sae_name = build_sae(sae_cfg).to(device).eval(), f"random topk {d}->{sae_cfg.d_sae}, k={sae_cfg.k}"
    bos_id = int(model.tokenizer.bos_token_id) if cfg.prepend_bos else None
    plan = ablation_plan(tokens, params.evaluate.split, max_text_length=cfg.max_text_length,
                         prepend_bos=cfg.prepend_bos, overlap=cfg.overlap(), max_tokens=args.tokens)
    lengths = plan.length + int(cfg.prepend_bos)
    batches = [build_batch(plan, b, tokens, bos_id, 0)
               for b in batch_windows(lengths, cfg.activation_batch_size * cfg.max_text_length)]
    cache_path = REPO / params.activations.output_dir / "activations.h5"
    mean = torch.zeros(int(model.cfg.d_model))
    if cache_path.is_file():
        with ActivationCache(cache_path) as cache:
            mean = torch.from_numpy(cache.mean(params.evaluate.split))
    splices = replacements(sae, mean)
    acc = AblationAccumulator(splices)

    bare_seconds = ablation_seconds = 0.0
    positions = 0
    with torch.inference_mode():
        model(batches[0].tokens[:1, :8].to(device))  # warm-up
        for i, wb in enumerate(batches):
            x = wb.tokens.to(device)
            rows, targets = wb.row_select
            scored = targets >= 2
            for side in ("bare", "ablation") if i % 2 == 0 else ("ablation", "bare"):
                started = time.perf_counter()
                if side == "bare":
                    model(x)
                    bare_seconds += time.perf_counter() - started
                else:
                    acc.add(model, hook, splices, x, (rows[scored], targets[scored] - 1))
                    ablation_seconds += time.perf_counter() - started
            positions += wb.model_tokens
    value, baseline = positions / ablation_seconds, positions / bare_seconds
    passes = 1 + len(splices)
    print(json.dumps({"figure": "ablation_result", "sae": sae_name, **acc.result()}))
    print(json.dumps({
        "benchmark": "evaluate_ablation_pass",
        "value": round(value, 1),
        "unit": "tokens/s",
        "baseline": f"bare forward of the same model to the logits on the same batches ({cfg.forward_dtype})",
        "baseline_value": round(baseline, 1),
        "ratio": round(value / baseline, 4),
        "goal": f">= {0.9 / passes:.2f} ({passes} forwards, each at >= 0.9 of a bare one)",
        "forward_passes": passes,
        "ratio_per_forward": round(passes * value / baseline, 4),
        "model_positions": positions,
        "scored_predictions": acc.tokens,
        "batches": len(batches),
        "hook": hook.full_name,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
