"""Reconstruction quality against a peer library on identical data: our TopK/BatchTopK vs SAELens's.

Every SAE trains on the same rows of one activation cache (outliers left out, normalised by our scale
sqrt(d_in) / mean train norm), in the same batches in the same order (our trainer's seeded epoch shuffle),
for the same number of steps, with the same batch size, d_sae and k:

    ours_batch_topk, ours_topk      our real trainer (`saepipe.training.trainer.Trainer`), params.yaml `train:`
                                     (override any key with --set key=value)
    saelens_topk, saelens_batch_topk SAELens's TopKTrainingSAE / BatchTopKTrainingSAE trained by its own
                                     SAETrainer (its step: grad-norm clip 1.0, its Adam, its AuxK, its
                                     dead window), at its default LR (3e-4) and at ours, with our warm-up and
                                     linear decay (its "constant" scheduler with lr_warm_up_steps/lr_decay_steps)

Each is evaluated on the same validation rows (normalised) by
    ours:    `saepipe.analysis.quick.evaluate_activations` (what `saepipe evaluate` reports: FVU, L0, dead)
    SAELens: `sae_lens.evals.ExplainedVarianceCalculator` (FVU = 1 - its explained variance) and L0 as
             `get_sparsity_and_variance_metrics` computes it, (acts != 0).sum(-1).mean(); that function itself
             needs a model and an activation store, so its per-batch pieces are applied to the cached rows.
SAELens SAEs are evaluated as it exports them (`save_inference_model` + `SAE.load_from_disk`: BatchTopK
becomes JumpReLU with its running threshold). BatchTopK SAEs (both libraries) are also evaluated with one
global threshold set so that L0 = k exactly on the evaluated (validation) rows ("@k" rows): an evaluation
device for equal L0, not what either library exports (ours calibrates on training rows, so its exported L0 on
held-out rows runs a little above k; the exported figure is printed too).

Prints one JSON line per SAE evaluation, then last one JSON object:
    value          our best FVU at L0 = k (ours TopK, or ours BatchTopK calibrated to k)
    baseline_value the best SAELens FVU at L0 = k (its TopK at either LR, its BatchTopK calibrated to k)
    ratio          value / baseline_value; goal <= 0.95 with <= 5 % dead latents (dead: never fires on the
                   validation rows)

Without sae-lens (it is the optional `peers` extra, never needed by the pipeline) it says so and exits 0
with value null. The default cache is this checkout's `data/activations/activations.h5` (`dvc repro
activations`).

    python benchmarks/quality.py                      # the default cache, params.yaml's train: settings
    python benchmarks/quality.py --quick              # about a minute: few rows, small SAEs
    python benchmarks/quality.py --only ours --set aux_coefficient=0.125 --set lr=0.004   # knob search
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the trainers' progress bars

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.analysis.quick import evaluate_activations  # noqa: E402
from saepipe.config import load_params, replace_values  # noqa: E402
from saepipe.kernels import exact_cut  # noqa: E402
from saepipe.sae import build_sae, config_from_params  # noqa: E402
from saepipe.training.data import ActivationData, epoch_order, iter_batches, load_activation_data  # noqa: E402
from saepipe.training.trainer import Trainer  # noqa: E402

NOTE = "sae-lens not installed: pip install -e '.[peers]'"
GOAL = "≤ 0.95 with ≤ 5 % dead"
EVAL_BATCH = 4096


# ---- data --------------------------------------------------------------------------------------------------------
def batches(data: ActivationData, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Exactly the batches our trainer sees, in its order: the seeded shuffle of each epoch, normalised."""
    for epoch in range(1, epochs + 1):
        yield from iter_batches(data.train, epoch_order(data.n_train, seed, epoch), batch_size, data.scale,
                                torch.device("cpu"))


def validation(data: ActivationData) -> torch.Tensor:
    return data.validation.float() * data.scale


# ---- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(sae: Any, rows: torch.Tensor, saelens_evals: Any | None) -> dict[str, float]:
    """Our evaluate code's FVU, L0 and dead %, and SAELens's FVU and L0 on the same rows (if installed)."""
    chunks = [(rows[i : i + EVAL_BATCH], np.zeros(min(EVAL_BATCH, len(rows) - i), bool))
              for i in range(0, len(rows), EVAL_BATCH)]
    ours = evaluate_activations(sae, chunks).figures()
    out = {"fvu_ours": ours["reconstruction"]["fvu"], "l0_ours": ours["sparsity"]["l0_mean"],
           "dead_pct": ours["sparsity"]["dead_feature_percentage"],
           "fvu_saelens": None, "l0_saelens": None}
    if saelens_evals is not None:
        calculator = saelens_evals.ExplainedVarianceCalculator()
        l0 = []
        for x, _ in chunks:
            acts = sae.encode(x)
            calculator.add_batch(sae_output=sae.decode(acts), hidden_acts=x)
            l0.append((acts != 0).sum(dim=-1).float())
        out["fvu_saelens"] = 1.0 - calculator.compute()
        out["l0_saelens"] = torch.cat(l0).mean().item()
    return out


# ---- ours --------------------------------------------------------------------------------------------------------
def train_ours(params: Any, data: ActivationData, sae_type: str, lr: float) -> tuple[Any, float]:
    cfg = replace_values(params.train, sae_type=sae_type, lr=lr, device="cpu", wandb=False, resume=False)
    torch.manual_seed(cfg.seed)
    sae = build_sae(config_from_params(dataclasses.asdict(cfg.sae), data.d_in))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(sae, data, cfg, Path(tmp), None, torch.device("cpu"), progress=False).fit()
    return sae.eval(), time.perf_counter() - started


def calibrate_ours(sae: Any, rows: torch.Tensor) -> Any:
    import copy

    calibrated = copy.deepcopy(sae)
    with torch.no_grad():
        calibrated.calibrate_([rows], len(rows))  # the trainer's own exact calibration, on these rows
    return calibrated


# ---- SAELens ---------------------------------------------------------------------------------------------------
class Peer:
    """A SAELens inference SAE seen through the few attributes our evaluate code reads (d_sae, W_enc, encode,
    decode); encode and decode are its own."""

    def __init__(self, sae: Any):
        self.sae = sae
        self.W_enc = sae.W_enc
        self.d_sae = int(sae.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(features)


# ---- SAELens training -------------------------------------------------------------------------------------------
def train_saelens(sae_lens: Any, data: ActivationData, arch: str, *, d_sae: int, k: int, lr: float,
                  batch_size: int, epochs: int, seed: int, warmup: int, decay_fraction: float,
                  betas: tuple[float, float]) -> tuple[Any, float]:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    config_cls = {"topk": sae_lens.TopKTrainingSAEConfig, "batch_topk": sae_lens.BatchTopKTrainingSAEConfig}[arch]
    sae_cls = {"topk": sae_lens.TopKTrainingSAE, "batch_topk": sae_lens.BatchTopKTrainingSAE}[arch]
    torch.manual_seed(seed)
    sae = sae_cls(config_cls(d_in=data.d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    total = data.n_train * epochs
    steps = math.ceil(data.n_train / batch_size) * epochs
    # lr_end: its runner's default (lr / 10); the "constant" scheduler decays from lr to 0 regardless
    trainer_cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=batch_size, lr=lr,
                                   lr_end=lr / 10, lr_scheduler_name="constant",
                                   lr_warm_up_steps=warmup, lr_decay_steps=round(decay_fraction * steps),
                                   adam_beta1=betas[0], adam_beta2=betas[1], device="cpu")
    started = time.perf_counter()
    SAETrainer(trainer_cfg, sae, batches(data, batch_size, epochs, seed)).fit()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:  # its exported inference SAE (BatchTopK -> JumpReLU)
        sae.save_inference_model(tmp)
        inference = sae_lens.SAE.load_from_disk(tmp, device="cpu")
    return Peer(inference.eval()), seconds


def calibrate_saelens(sae: Any, rows: torch.Tensor, k: int) -> Any:
    import copy

    calibrated = Peer(copy.deepcopy(sae.sae))
    inner = calibrated.sae
    with torch.no_grad():
        pre = inner.process_sae_in(rows) @ inner.W_enc + inner.b_enc
        inner.threshold.fill_(exact_cut([pre], k, len(rows))[0])
    return calibrated


# ---- main --------------------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.removeprefix("train.")] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "activations" / "activations.h5")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--expansion", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--max-train-rows", type=int)
    parser.add_argument("--lr-ours", type=float, help="our LR (default params.yaml train.lr); SAELens runs at it "
                        "and at its default 3e-4")
    parser.add_argument("--lr-saelens-default", type=float, default=3e-4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml train: key (YAML value), e.g. --set aux_coefficient=0.125")
    parser.add_argument("--only", choices=["ours", "saelens", "all"], default="all")
    parser.add_argument("--arch", choices=["batch_topk", "topk", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a tiny setting: 8k rows, expansion 2, k 16, 2 epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    try:
        import sae_lens
        import sae_lens.evals as saelens_evals
    except ImportError:
        sae_lens = saelens_evals = None
        print(NOTE)

    if sae_lens is None and args.only != "ours":  # nothing to compare with: the figure is undefined
        print(json.dumps(final_line(None, None, None, NOTE), ensure_ascii=False))
        return

    params = load_params(args.params)
    changes = parse_overrides(args.set)
    if args.quick:
        changes.update(max_train_rows=8192, sae_expansion=2, topk=16, num_epochs=2, batch_size=1024,
                       lr_warmup_steps=4)
    for flag, key in (("epochs", "num_epochs"), ("batch_size", "batch_size"), ("expansion", "sae_expansion"),
                      ("k", "topk"), ("max_train_rows", "max_train_rows"), ("lr_ours", "lr")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    params = dataclasses.replace(params, train=replace_values(params.train, **changes))
    cfg = params.train
    if not args.cache.is_file():
        raise SystemExit(f"{args.cache}: no activation cache (run `dvc repro activations`, or pass --cache)")
    data = load_activation_data(args.cache, include_outliers=False, max_train_rows=cfg.max_train_rows,
                                normalize=cfg.normalize_activations, seed=cfg.seed)
    k, d_sae = cfg.sae.topk, cfg.sae.sae_expansion * data.d_in
    val = validation(data)
    epochs = cfg.epochs(data.n_train)  # num_epochs, or what train.training_tokens takes
    steps = math.ceil(data.n_train / cfg.batch_size) * epochs
    print(json.dumps({"setting": {"cache": str(args.cache), "train_rows": data.n_train,
                                  "validation_rows": int(val.shape[0]), "epochs": epochs,
                                  "batch_size": cfg.batch_size, "steps": steps, "d_in": data.d_in, "d_sae": d_sae,
                                  "k": k, "lr_ours": cfg.lr, "overrides": changes}}))

    rows: list[dict[str, Any]] = []

    def report(name: str, lib: str, arch: str, lr: float, sae: Any, seconds: float, at_k: bool) -> None:
        row = {"name": name, "lib": lib, "arch": arch, "lr": lr, **evaluate(sae, val, saelens_evals),
               "seconds": round(seconds, 1), "at_k": at_k}
        rows.append(row)
        print(json.dumps(row), flush=True)

    archs = ["batch_topk", "topk"] if args.arch == "both" else [args.arch]
    if args.only in ("ours", "all"):
        for arch in archs:
            sae, seconds = train_ours(params, data, arch, cfg.lr)
            report(f"ours_{arch}", "ours", arch, cfg.lr, sae, seconds, at_k=arch == "topk")
            if arch == "batch_topk":
                report(f"ours_{arch}@k", "ours", arch, cfg.lr, calibrate_ours(sae, val), seconds, at_k=True)
    if sae_lens is not None and args.only in ("saelens", "all"):
        for arch in archs:
            for lr in dict.fromkeys([args.lr_saelens_default, cfg.lr]):
                sae, seconds = train_saelens(sae_lens, data, arch, d_sae=d_sae, k=k, lr=lr,
                                             batch_size=cfg.batch_size, epochs=epochs, seed=cfg.seed,
                                             warmup=cfg.lr_warmup_steps, decay_fraction=cfg.lr_decay_fraction,
                                             betas=tuple(cfg.adam_betas))
                report(f"saelens_{arch}", "saelens", arch, lr, sae, seconds, at_k=arch == "topk")
                if arch == "batch_topk":
                    report(f"saelens_{arch}@k", "saelens", arch, lr, calibrate_saelens(sae, val, k), seconds,
                           at_k=True)

    def best(lib: str) -> dict[str, Any] | None:
        candidates = [r for r in rows if r["lib"] == lib and r["at_k"]]
        return min(candidates, key=lambda r: r["fvu_ours"]) if candidates else None

    ours, theirs = best("ours"), best("saelens")
    schedule = f"warm-up {cfg.lr_warmup_steps} steps, linear decay over the last {cfg.lr_decay_fraction}"
    print(json.dumps(final_line(ours, theirs, schedule, None), ensure_ascii=False))


def final_line(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, schedule: str | None,
               note: str | None) -> dict[str, Any]:
    return {
        "benchmark": "quality_fvu_vs_saelens",
        "value": ours["fvu_ours"] if ours else None,
        "unit": "FVU at L0 = k (validation rows, our evaluate code)",
        "value_sae": ours["name"] if ours else None,
        "value_dead_pct": ours["dead_pct"] if ours else None,
        "baseline": "best SAELens at equal L0",
        "baseline_value": theirs["fvu_ours"] if theirs else None,
        "baseline_sae": f"{theirs['name']} lr {theirs['lr']}" if theirs else None,
        "baseline_dead_pct": theirs["dead_pct"] if theirs else None,
        "ratio": ours["fvu_ours"] / theirs["fvu_ours"] if ours and theirs else None,
        "goal": GOAL,
        "lr_schedule": schedule,
        "note": note,
    }

if __name__ == "__main__":
    main()
