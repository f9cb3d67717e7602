"""`saepipe synth generate` / `saepipe synth score`: synthetic activations with a known answer.

Not a DVC stage. `generate --out DIR` draws a seeded ground truth and rows from it into DIR as an ordinary
activation cache, the truth beside it (`saepipe.synth.store`): with activations.output_dir=DIR, `saepipe train`
trains on it unchanged. `score --truth DIR --sae EXPORT` scores an exported SAE against the truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from saepipe.config.fields import field_docs
from saepipe.errors import UserError
from saepipe.storage import write_json
from saepipe.synth.generate import SynthConfig
from saepipe.synth.score import RECOVERED_COSINE, SCORE_ROWS, Score

FLAG_TYPES = {int: "INT", float: "FLOAT", str: "TEXT"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="draw a synthetic setting into DIR (activations.h5 + truth)",
                                  description="Draw a seeded ground-truth dictionary and rows from it into DIR: "
                                  "activations.h5 (the activation cache format), truth.safetensors, truth.json.")
    generate.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if missing)")
    generate.add_argument("--storage-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                          help="dtype of the cached rows (default: float32)")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = generate.add_argument_group("setting")
    docs = field_docs(SynthConfig)
    hints = typing.get_type_hints(SynthConfig)
    for field in dataclasses.fields(SynthConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{docs.get(field.name, '')} (default: {field.default})"
        if hints[field.name] is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                               help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=hints[field.name], default=field.default,
                               metavar=FLAG_TYPES[hints[field.name]], help=help_text)
    score = actions.add_parser("score", help="score an exported SAE against a synthetic truth",
                               description="Match each true feature to the SAE latent with the closest decoder "
                               "direction; report MCC, the fraction recovered, firing F1, shrinkage, FVU and L0 "
                               "on fresh rows drawn from the truth.")
    score.add_argument("--truth", required=True, metavar="DIR", help="a folder written by `saepipe synth generate`")
    score.add_argument("--sae", required=True, metavar="DIR", help="an exported SAE (`saepipe export`)")
    score.add_argument("--rows", type=int, default=SCORE_ROWS, metavar="INT",
                       help=f"fresh rows drawn to score firing, shrinkage, FVU and L0 (default: {SCORE_ROWS})")
    score.add_argument("--json", metavar="FILE", help="also write the metrics to FILE")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    cfg.validate()
    return cfg


def generate(args: argparse.Namespace) -> None:
    from saepipe.synth.store import write_synthetic

    cfg = config_from_args(args)
    summary = write_synthetic(cfg, args.out, args.storage_dtype, progress=not args.no_progress)
    print(f"synth: {cfg.name}: {summary['train_rows']:,} train + {summary['validation_rows']:,} validation rows x "
          f"{cfg.d_in} from {cfg.n_features:,} true features ({summary['mean_active_per_row']:.1f} active per row, "
          f"{summary['children']:,} children, noise {cfg.noise_std:g}) -> {Path(args.out)}/ "
          f"[{summary['seconds']:.0f} s]")


def check_provenance(sae: typing.Any, fingerprint: str, truth_dir: str) -> None:
    """Refuse an SAE recorded as trained on another synthetic truth: its scores would mean nothing."""
    config = getattr(getattr(sae, "provenance", None), "config", None) or {}
    trained_on = ((config.get("data") or {}).get("cache_attrs") or {}).get("tokenizer_fingerprint")
    if isinstance(trained_on, str) and trained_on.startswith("synthetic:") and trained_on != fingerprint:
        raise UserError(f"--sae was trained on another synthetic setting ({trained_on[:26]}...) than --truth="
                        f"{truth_dir} ({fingerprint[:26]}...); score it against its own truth")


def summary_line(score: Score, name: str) -> str:
    m = score.metrics
    return (f"synth score: {name}: MCC {m['mcc']:.3f} (chance {m['chance_mcc']:.3f}), recovered@"
            f"{RECOVERED_COSINE:g} {m['recovered']:.1%} of {m['n_features']:,}, F1 {m['f1']:.3f}, shrinkage "
            f"{m['shrinkage']:.3f}, FVU {m['fvu']:.4f}, L0 {m['l0']:.1f} on {m['rows']:,} fresh rows")


def score(args: argparse.Namespace) -> None:
    from saepipe.sae.formats import load_sae
    from saepipe.synth.score import score_sae
    from saepipe.synth.store import fingerprint_attr, read_truth

    truth = read_truth(args.truth)
    sae = load_sae(args.sae)
    check_provenance(sae, fingerprint_attr(truth), args.truth)
    result = score_sae(sae, truth, rows=args.rows, progress=not args.no_progress)
    if args.json:
        write_json(args.json, {"truth": str(args.truth), "sae": str(args.sae), **result.summary()})
    print(summary_line(result, truth.config.name) + (f" -> {args.json}" if args.json else ""))


def run(args: argparse.Namespace) -> None:
    {"generate": generate, "score": score}[args.action](args)
