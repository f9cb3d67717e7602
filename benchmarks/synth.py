"""Ground truth: do the five architectures recover features that are really there?

One synthetic setting (`saepipe synth generate` defaults: d_in 256, 4,096 true features, ~30 active per row,
Zipf firing, 20% children, copula correlation 0.1, noise 0.02, a bias), 200k rows. Each architecture
trains through the real stages (`saepipe train` on the cache unchanged, `saepipe export`) with the same
width (4,096 latents), rows, token budget, batch and learning rate: the top-k family at k = 30; standard and
JumpReLU at a sparsity penalty searched for first (full-budget runs, x4 steps until L0 = 30 is bracketed, then
secant steps in log penalty / log L0, until the validation L0 lands within 15 % of 30; the run nearest 30 is the
one scored, and the table prints the L0 it reaches).
Each export is scored by `saepipe synth score`'s core on fresh rows. One JSON line per architecture, then
the summary: value = BatchTopK's MCC, baseline = a randomly initialised SAE of the same shape scored the
same way, ratio = value / baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
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
PENALTIES = {"standard": 0.007, "jumprelu": 1500.0}
"""Starting points of the penalty search for the two architectures without k (near L0 = 30 at 1M tokens on the
default setting: standard 0.0034 gave 495, 0.0137 gave 15 at 200k tokens; JumpReLU 2048 gave 25, 512 and below
left every threshold where it started)."""
SEARCH_TOLERANCE = 0.15


def train_and_export(arch: str, root: Path, args: argparse.Namespace, penalty: float, tokens: int | None = None,
                     rows: int | None = None, name: str | None = None) -> tuple[Path, float]:
    name = name or arch
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["activations"]["output_dir"] = str(root / "data")
    params["train"].update(run_name=name, sae_type=arch, sae_expansion=args.expansion, topk=K, num_epochs=None,
                           training_tokens=tokens or args.tokens, max_train_rows=rows, batch_size=args.batch_size,
                           lr=args.lr, sparsity_penalty=penalty, device="cpu", output_dir=str(root / "runs"),
                           log_freq=1000)
    params["export"].update(output_dir=str(root / "sae"))
    params_file = root / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--params", str(params_file)]) or main(["export", "--params", str(params_file)])
    if code:
        raise SystemExit(f"{arch}: train/export failed:\n{log.getvalue()}")
    return root / "sae" / name, time.perf_counter() - started


def next_penalty(tried: list[dict]) -> float:
    """Secant step in log-penalty / log-L0 through the two runs nearest the target, x4 or /4 while only one side of
    K has been seen (L0 falls as the penalty grows)."""
    above = [t for t in tried if t["val_l0"] > K]
    below = [t for t in tried if t["val_l0"] <= K]
    if not below:
        return max(t["sparsity_penalty"] for t in above) * 4
    if not above:
        return min(t["sparsity_penalty"] for t in below) / 4
    low = max(above, key=lambda t: t["sparsity_penalty"])   # largest penalty still above K
    high = min(below, key=lambda t: t["sparsity_penalty"])  # smallest penalty already below K
    x0, x1 = math.log(low["sparsity_penalty"]), math.log(high["sparsity_penalty"])
    y0, y1 = math.log(max(low["val_l0"], 1e-3)), math.log(max(high["val_l0"], 1e-3))
    x = x0 + (math.log(K) - y0) * (x1 - x0) / (y1 - y0)
    margin = 0.1 * (x1 - x0)  # stay strictly inside the bracket
    return math.exp(min(max(x, x0 + margin), x1 - margin))


def search_penalty(arch: str, root: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Short runs until one lands within SEARCH_TOLERANCE of L0 = K (at most --search-steps). Returns the run
    nearest K (log scale), never an untried penalty, and all runs tried."""
    tried: list[dict] = []
    penalty = PENALTIES[arch]
    for step in range(args.search_steps):
        sae_dir, seconds = train_and_export(arch, root, args, penalty, tokens=args.search_tokens,
                                            rows=args.search_rows, name=f"{arch}-search{step}")
        l0 = json.loads((sae_dir / "history.json").read_text())[-1]["val_l0"]
        tried.append({"sparsity_penalty": penalty, "val_l0": round(l0, 2), "dir": sae_dir, "seconds": seconds})
        if abs(l0 - K) <= SEARCH_TOLERANCE * K:
            break
        penalty = next_penalty(tried)
    best = min(tried, key=lambda t: abs(math.log(max(t["val_l0"], 1e-3) / K)))
    return best, [{k: t[k] for k in ("sparsity_penalty", "val_l0")} for t in tried]


def row(name: str, result: dict, seconds: float | None, **extra) -> dict:
    keys = ("l0", "fvu", "mcc", "recovered", "f1", "shrinkage", "mcc_learned")
    return {"architecture": name, **{k: round(result[k], 4) for k in keys}, "seconds": None if seconds is None
            else round(seconds, 1), **extra}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows, train + validation")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget of every architecture")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--expansion", type=int, default=16,
                        help="latents per input dim (16: as many latents as true features)")
    parser.add_argument("--score-rows", type=int, default=20_000)
    parser.add_argument("--only", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--penalty", nargs=2, action="append", metavar=("ARCH", "VALUE"), default=[],
                        help="use this sparsity penalty instead of searching, e.g. --penalty standard 3")
    parser.add_argument("--search-steps", type=int, default=4, help="runs per penalty search at most")
    parser.add_argument("--search-rows", type=int, default=None,
                        help="training rows of a search run (default: all; fewer is faster but may land elsewhere)")
    parser.add_argument("--search-tokens", type=int, default=None,
                        help="training budget of a search run (default: --tokens, so the run that lands is the "
                             "one scored; short runs land elsewhere, JumpReLU's thresholds move slowly)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    given = {a: float(v) for a, v in args.penalty}
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["synth", "generate", "--out", str(root / "data"), "--rows", str(args.rows),
                         "--no-progress"]) == 0
        truth = read_truth(root / "data")
        print(json.dumps({"setting": truth.config.name, "rows": args.rows, "d_in": truth.config.d_in,
                          "n_features": truth.config.n_features, "tokens": args.tokens, "batch_size": args.batch_size,
                          "generate_seconds": round(time.perf_counter() - started, 1)}), flush=True)
        torch.manual_seed(0)
        random_sae = build_sae(sae_config("topk", d_in=truth.config.d_in, d_sae=truth.config.d_in * args.expansion,
                                          k=K)).eval()
        baseline = score_sae(random_sae, truth, rows=args.score_rows).summary()
        print(json.dumps(row("random init", baseline, None)), flush=True)
        results = {}
        for arch in args.only:
            extra: dict = {"k": K}
            penalty = 0.0
            final = None
            if arch in PENALTIES:
                searched = time.perf_counter()
                if arch in given:
                    penalty, tried = given[arch], []
                else:
                    best, tried = search_penalty(arch, root, args)
                    penalty = best["sparsity_penalty"]
                    if args.search_tokens in (None, args.tokens) and args.search_rows is None:
                        final = best["dir"], best["seconds"]  # the search ran the full budget: score that run
                extra = {"sparsity_penalty": penalty, "search": tried,
                         "search_seconds": round(time.perf_counter() - searched, 1)}
            sae_dir, seconds = final or train_and_export(arch, root, args, penalty)
            results[arch] = score_sae(load_sae(sae_dir), truth, rows=args.score_rows).summary()
            print(json.dumps(row(arch, results[arch], seconds, **extra)), flush=True)
    head = "batch_topk" if "batch_topk" in results else args.only[0]
    value = results[head]["mcc"]
    print(json.dumps({"benchmark": "synth_ground_truth_mcc", "value": round(value, 4),
                      "unit": f"MCC ({head}, true->learned mean max cosine)", "baseline": "random init SAE",
                      "baseline_value": round(baseline["mcc"], 4), "ratio": round(value / baseline["mcc"], 3),
                      "goal": "well above chance (ratio > 1); higher recovered@0.9 at equal L0 is better"}))


if __name__ == "__main__":
    main_benchmark()
