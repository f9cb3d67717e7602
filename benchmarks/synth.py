"""Ground truth: do the five architectures recover features that are really there?

One synthetic setting (`saepipe synth generate` defaults: d_in 256, 4,096 true features, ~30 active per row,
Zipf firing, 20% children, copula correlation 0.1, noise 0.02, a bias), 200k rows. Each architecture
trains through the real stages (`saepipe train` on the cache unchanged, `saepipe export`) with the same
width (4,096 latents), rows, epochs, batch and learning rate; the top-k family at k = 30, standard and
JumpReLU at the fixed sparsity penalties below (their L0 is printed; change them with --penalty). The
search for penalties that land at L0 30 is NOT done: on this setting standard gave L0 283 at 2.0 (one short
epoch of 40k rows) and collapsed to L0 1.5 at 8.0; JumpReLU stayed dense (L0 920) at 0.5; see PENALTIES.
Each export is scored by `saepipe synth score`'s core on fresh rows. One JSON line per architecture, then
the summary: value = BatchTopK's MCC, baseline = a randomly initialised SAE of the same shape scored the
same way, ratio = value / baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.cli import main  # noqa: E402
from saepipe.sae import build_sae, sae_config  # noqa: E402
from saepipe.sae.formats import load_sae  # noqa: E402
from saepipe.synth.score import score_sae  # noqa: E402
from saepipe.synth.store import read_truth  # noqa: E402

ARCHITECTURES = ("batch_topk", "topk", "matryoshka", "standard", "jumprelu")
K = 30
PENALTIES = {"standard": 8.0, "jumprelu": 0.5}
"""Sparsity penalties of the two architectures without k: first guesses, not yet tuned to L0 30 (see the
module docstring); the table's L0 column shows where they land."""


def train_and_export(arch: str, root: Path, args: argparse.Namespace, penalty: float) -> tuple[Path, float]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["activations"]["output_dir"] = str(root / "data")
    params["train"].update(run_name=arch, sae_type=arch, sae_expansion=args.expansion, topk=K, num_epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, lr_warmup_steps=20, sparsity_penalty=penalty,
                           device="cpu", output_dir=str(root / "runs"), log_freq=1000, checkpoint_freq=args.epochs)
    params["export"].update(output_dir=str(root / "sae"))
    params_file = root / f"{arch}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--params", str(params_file)]) or main(["export", "--params", str(params_file)])
    if code:
        raise SystemExit(f"{arch}: train/export failed:\n{log.getvalue()}")
    return root / "sae" / arch, time.perf_counter() - started


def row(name: str, result: dict, seconds: float | None, **extra) -> dict:
    keys = ("l0", "fvu", "mcc", "recovered", "f1", "shrinkage", "mcc_learned")
    return {"architecture": name, **{k: round(result[k], 4) for k in keys}, "seconds": None if seconds is None
            else round(seconds, 1), **extra}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows, train + validation")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--expansion", type=int, default=16,
                        help="latents per input dim (16: as many latents as true features)")
    parser.add_argument("--score-rows", type=int, default=20_000)
    parser.add_argument("--only", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--penalty", nargs=2, action="append", metavar=("ARCH", "VALUE"), default=[],
                        help="override a sparsity penalty, e.g. --penalty standard 3")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    penalties = {**PENALTIES, **{a: float(v) for a, v in args.penalty}}
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["synth", "generate", "--out", str(root / "data"), "--rows", str(args.rows),
                         "--no-progress"]) == 0
        truth = read_truth(root / "data")
        print(json.dumps({"setting": truth.config.name, "rows": args.rows, "d_in": truth.config.d_in,
                          "n_features": truth.config.n_features, "epochs": args.epochs, "batch_size": args.batch_size,
                          "generate_seconds": round(time.perf_counter() - started, 1)}), flush=True)
        torch.manual_seed(0)
        random_sae = build_sae(sae_config("topk", d_in=truth.config.d_in, d_sae=truth.config.d_in * args.expansion,
                                          k=K)).eval()
        baseline = score_sae(random_sae, truth, rows=args.score_rows).summary()
        print(json.dumps(row("random init", baseline, None)), flush=True)
        results = {}
        for arch in args.only:
            penalty = penalties.get(arch, 0.0)
            sae_dir, seconds = train_and_export(arch, root, args, penalty)
            results[arch] = score_sae(load_sae(sae_dir), truth, rows=args.score_rows).summary()
            extra = {"sparsity_penalty": penalty} if arch in penalties else {"k": K}
            print(json.dumps(row(arch, results[arch], seconds, **extra)), flush=True)
    head = "batch_topk" if "batch_topk" in results else args.only[0]
    value = results[head]["mcc"]
    print(json.dumps({"benchmark": "synth_ground_truth_mcc", "value": round(value, 4),
                      "unit": f"MCC ({head}, true->learned mean max cosine)", "baseline": "random init SAE",
                      "baseline_value": round(baseline["mcc"], 4), "ratio": round(value / baseline["mcc"], 3),
                      "goal": "well above chance (ratio > 1); higher recovered@0.9 at equal L0 is better"}))


if __name__ == "__main__":
    main_benchmark()
