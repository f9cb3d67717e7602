"""The `evaluate` stage's ablation pass: the split forward against one full forward per variant.

value    = scored predictions/s of the pass as `evaluate` runs it now (`AblationAccumulator`, split=True): the
           model up to the hook once per batch, then the blocks above it once for the five runs (clean, SAE,
           SAE + error, zero, mean) stacked into one batch, the final norm and unembedding only at the scored
           positions
baseline = scored predictions/s of the old pass on the same batches (split=False): a clean forward and four
           spliced full forwards to the logits at every position, the splice as a hook
ratio    = value / baseline; goal >= 1.8. Both sides must give the same figures (CE clean / SAE / zero / mean,
           KL, CE recovered; asserted to 1e-4 relative) or the benchmark fails. The sides alternate batch by
           batch in one process, after an untimed warm-up of both (which runs the split's one-time check);
           each batch's fastest of `--repeats` rounds counts (the CPUs are shared).

Inputs, from `--root` (default: this checkout) as the stage finds them: `models/base` (the default
SmolLM2-135M), `data/tokens.h5`, the activation cache's split mean and this run's exported SAE (else a
random TopK SAE on the same hook). Windows follow the stage's rules (overlap, 8 per batch) but are
`--window` long (0: the run's max_text_length). Where the model or tokens are missing, or with `--tiny`, a
random Llama of SmolLM2's width with `--tiny-layers` layers on random token windows stands in.

Measured on 2 shared CPU cores (quiet at the time), the default run (SmolLM2-135M, float32, hook 15 of 30):
the default (one 256-token window) 1.51x; `--window 128 --tokens 96` (one 128-token window) 1.95x;
`--tokens 1600 --repeats 2` (one full batch of 8 windows, the stage's shape) 1.36x; on a later quiet run
after the merge: default 1.61x, the stage's shape 1.91x and 1.38x in two runs (the shared cores are noisy).
Figures identical in all. The arithmetic: 16 blocks once + 5 x (14 blocks + the head at scored
positions) against 5 x (30 blocks + the head at every position), the head costing about seven of SmolLM2's
blocks; stacking the runs helps small batches only.

    python benchmarks/ablation.py [--root /work/main] [--tokens 300] [--window 0] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.activations.cache import ActivationCache  # noqa: E402
from saepipe.activations.extract import build_batch  # noqa: E402
from saepipe.activations.windows import batch_windows  # noqa: E402
from saepipe.analysis.ablation import AblationAccumulator, ablation_plan, replacements  # noqa: E402
from saepipe.config import load_params  # noqa: E402
from saepipe.corpus.tokens import read_token_cache  # noqa: E402
from saepipe.model.hooks import HookSpec, block_hook_names, resolve_hook  # noqa: E402
from saepipe.model.loading import load_hooked_model, resolve_device  # noqa: E402
from saepipe.model.split import SplitForward  # noqa: E402
from saepipe.paths import activation_cache, evaluated_sae  # noqa: E402
from saepipe.sae import build_sae, sae_config  # noqa: E402
from saepipe.sae.formats import load_sae  # noqa: E402

FIGURES = ("tokens", "ce_clean", "ce_sae", "ce_sae_with_error", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean",
           "ce_loss_recovered", "ce_loss_recovered_vs_mean", "kl_div_score")
Batch = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # tokens [batch, seq], scored (rows, positions)


def tiny_model(out: Path, layers: int) -> Path:
    """A random Llama of SmolLM2-135M's width and vocabulary with `layers` layers (its own small tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([__doc__] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out


def real_inputs(args: argparse.Namespace, root: Path, device: torch.device) -> tuple:
    params = load_params(args.params)
    cfg = params.activations
    tokens = read_token_cache(root / params.tokenize.output)
    model = load_hooked_model(root / params.base_model.output_dir, device=device, dtype=cfg.forward_dtype)
    hook = resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, model.cfg.n_layers,
                        block_hook_names(model.hook_dict))
    sae_dir = Path(args.sae) if args.sae else root / evaluated_sae(params)
    if sae_dir.is_dir():
        sae, sae_name = load_sae(sae_dir, device), str(sae_dir)
    else:
        sae, sae_name = random_sae(int(model.cfg.d_model), params.train.sae.sae_expansion, params.train.sae.topk,
                                   device)
    bos_id = int(model.tokenizer.bos_token_id) if cfg.prepend_bos else None
    window = args.window or cfg.max_text_length
    overlap = window // 4 if cfg.context_overlap is None else min(cfg.context_overlap, window // 2)
    plan = ablation_plan(tokens, params.evaluate.split, max_text_length=window, prepend_bos=cfg.prepend_bos,
                         overlap=overlap, max_tokens=args.tokens)
    batches = []
    for b in batch_windows(plan.length + int(cfg.prepend_bos), cfg.activation_batch_size * window):
        wb = build_batch(plan, b, tokens, bos_id, 0)
        rows, targets = wb.row_select
        scored = targets >= 2
        batches.append((wb.tokens.to(device), (rows[scored], targets[scored] - 1)))
    mean = torch.zeros(int(model.cfg.d_model))
    cache_path = root / activation_cache(params)
    if cache_path.is_file():
        with ActivationCache(cache_path) as cache:
            mean = torch.from_numpy(cache.mean(params.evaluate.split))
    return model, hook, sae, sae_name, mean, batches, f"{root / params.base_model.output_dir} ({cfg.forward_dtype})"


def random_sae(d: int, expansion: int, k: int, device: torch.device):
    torch.manual_seed(0)
    cfg = sae_config("topk", d_in=d, d_sae=expansion * d, k=k)
    return build_sae(cfg).to(device).eval(), f"random topk {d}->{cfg.d_sae}, k={k}"


def tiny_inputs(args: argparse.Namespace, workdir: Path, device: torch.device) -> tuple:
    model = load_hooked_model(tiny_model(workdir / "tiny", args.tiny_layers), device=device)
    hook = HookSpec(args.tiny_layers // 2, "hook_resid_post")
    sae, sae_name = random_sae(int(model.cfg.d_model), 8, 32, device)
    rng = np.random.default_rng(0)
    seq, rows = args.window or 256, 8
    batches = []
    for _ in range(max(1, -(-args.tokens // (rows * (seq - 2))))):
        tokens = torch.from_numpy(rng.integers(0, 300, (rows, seq))).to(device)
        positions = torch.arange(1, seq - 1)
        batches.append((tokens, (torch.arange(rows).repeat_interleave(seq - 2), positions.repeat(rows))))
    mean = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    return model, hook, sae, sae_name, mean, batches, f"random {args.tiny_layers}-layer Llama, SmolLM2's width"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO), help="the checkout whose models/ and data/ to use")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="this checkout's, as the code reads")
    parser.add_argument("--tokens", type=int, default=300, help="scored predictions to time (whole windows)")
    parser.add_argument("--window", type=int, default=0,
                        help="window length (0: activations.max_text_length, as the stage)")
    parser.add_argument("--sae", default=None, help="an exported SAE (default: the root's export, if any)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each batch's fastest counts")
    parser.add_argument("--tiny", action="store_true", help="a random small model, whatever the root holds")
    parser.add_argument("--tiny-layers", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.root).resolve()

    params = load_params(args.params)
    device = resolve_device(params.evaluate.device, "evaluate.device")
    model_dir, tokens_file = root / params.base_model.output_dir, root / params.tokenize.output
    real = (model_dir / "config.json").is_file() and tokens_file.is_file()
    with tempfile.TemporaryDirectory() as workdir:
        model, hook, sae, sae_name, mean, batches, model_name = (
            real_inputs(args, root, device) if real and not args.tiny else tiny_inputs(args, Path(workdir), device))
        splices = replacements(sae, mean)
        sides = {"split": AblationAccumulator(splices, split=True), "full": AblationAccumulator(splices, split=False)}
        best = {side: [float("inf")] * len(batches) for side in sides}
        with torch.inference_mode():
            # Warm-up, untimed: both paths on a slice, which also runs the split's one-time check (per model
            # and hook: the stage pays it once, on the start of one window).
            head = batches[0][0][:1, :16]
            for split in (True, False):
                AblationAccumulator(splices, split=split).add(model, hook, splices, head,
                                                              (torch.zeros(14, dtype=torch.long), torch.arange(1, 15)))
            for repeat in range(args.repeats):
                for i, (tokens, sources) in enumerate(batches):
                    for side in ("split", "full") if (i + repeat) % 2 == 0 else ("full", "split"):
                        acc = sides[side] if repeat == 0 else AblationAccumulator(splices, split=side == "split")
                        started = time.perf_counter()
                        acc.add(model, hook, splices, tokens, sources)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        best[side][i] = min(best[side][i], time.perf_counter() - started)
    seconds = {side: sum(times) for side, times in best.items()}
    assert sides["split"].path == "split", "the split forward fell back to full forwards"
    got, want = sides["split"].result(), sides["full"].result()
    for key in FIGURES:
        assert abs(got[key] - want[key]) <= 1e-4 * abs(want[key]) + 1e-7, (key, got[key], want[key])
    value, baseline = got["tokens"] / seconds["split"], want["tokens"] / seconds["full"]
    difference = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in FIGURES)
    print(json.dumps({"figure": "ablation_result", "sae": sae_name, **{key: got[key] for key in FIGURES},
                      "max_relative_difference": difference}))
    print(json.dumps({
        "benchmark": "evaluate_ablation_split_forward",
        "value": round(value, 2),
        "unit": "predictions/s",
        "baseline": "the old pass: one full forward per variant (clean + 4 spliced), same batches, same process",
        "baseline_value": round(baseline, 2),
        "ratio": round(value / baseline, 3),
        "goal": ">= 1.8",
        "model": model_name,
        "hook": hook.full_name,
        "blocks_above_hook": int(model.cfg.n_layers) - SplitForward(model, hook).start,
        "n_layers": int(model.cfg.n_layers),
        "scored_predictions": got["tokens"],
        "model_positions": sum(int(t.numel()) for t, _ in batches),
        "batches": len(batches),
        "seconds": {side: round(s, 3) for side, s in seconds.items()},
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
