"""Command `compare`: finished runs -> `analysis/compare/` (compare.json, README.md, frontier.png); with
`--features A B`, A's latents matched to B's (`analysis/compare/features/A--B/`, and A's browser shows them).

Runs come from three places (`compare.runs`): the workspace (`<evaluate.output_dir>/<run>/`), DVC experiments
(`dvc exp show`), and the models pipeline. Nothing is recomputed but the feature match.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from saepipe.compare import runs as found_runs
from saepipe.compare.match import METHOD, activation_correlation, match_features, unit_rows
from saepipe.compare.runs import Run
from saepipe.compare.write import (
    feature_records,
    match_summary,
    write_browser_matches,
    write_comparison,
    write_match,
)
from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.many_models import MODELS_FILE
from saepipe.paths import REPORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    select = parser.add_argument_group("which runs (none given: --all)")
    select.add_argument("--runs", nargs="+", metavar="NAME",
                        help="workspace runs: folders of evaluate.output_dir that evaluate finished")
    select.add_argument("--experiments", nargs="*", metavar="NAME",
                        help="DVC experiments (`dvc exp show`): the named ones, or every finished one")
    select.add_argument("--models", nargs="*", metavar="KEY",
                        help=f"the models pipeline's models ({MODELS_FILE}): the named ones, or every finished one")
    select.add_argument("--all", action="store_true", help="every finished run of the three kinds")
    parser.add_argument("--features", nargs=2, metavar=("A", "B"),
                        help="match A's latents to B's (decoder cosine, one to one) instead of comparing figures")


def select_runs(params: Params, args: argparse.Namespace) -> list[Run]:
    """The runs the flags name, each checked to exist and to have evaluate's figures."""
    everything = not (args.runs or args.experiments is not None or args.models is not None) or args.all
    chosen: list[Run] = []
    if everything or args.runs:
        workspace = found_runs.workspace_runs(params.evaluate.output_dir)
        chosen += _named(workspace, args.runs, f"workspace runs in {params.evaluate.output_dir}", "--runs")
    if everything or args.experiments is not None:
        experiments = found_runs.experiment_runs(found_runs.exp_show())
        chosen += _named(experiments, args.experiments, "finished DVC experiments", "--experiments")
    if everything or args.models is not None:
        models = found_runs.models_runs(MODELS_FILE)
        chosen += _named(models, args.models, f"finished models of {MODELS_FILE}", "--models")
    return dedupe(chosen)


def _named(available: list[Run], names: list[str] | None, what: str, flag: str) -> list[Run]:
    if not names:
        return available
    by_name = {r.name: r for r in available}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"{flag}: no {what} named {', '.join(missing)} (found: {', '.join(by_name) or 'none'}); "
                        "a run needs evaluate's figures (quick/headline.json)")
    return [by_name[n] for n in names]


def dedupe(runs: list[Run]) -> list[Run]:
    """One row per result: the workspace holds the outputs of the last experiment run in it, so a workspace run
    whose figures equal an experiment's is that experiment; and a name taken twice gets its source appended."""
    experiments = {tuple(r.metrics.items()) for r in runs if r.source == "experiment"}
    kept = [r for r in runs if r.source == "experiment" or tuple(r.metrics.items()) not in experiments]
    seen = Counter(r.name for r in kept)
    return [r if seen[r.name] == 1 else dataclasses.replace(r, name=f"{r.name} ({r.source})") for r in kept]


def run(params: Params, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    out_dir = Path(params.compare.output_dir)
    runs = select_runs(params, args)
    if args.features:
        return compare_features(params, runs, *args.features, out_dir, started)
    if not runs:
        raise UserError("no finished run to compare: run the pipeline (`dvc repro`) or experiments "
                        "(`dvc exp run`) first; a run needs evaluate's quick/headline.json")
    if len(runs) < 2:
        raise UserError(f"only one finished run ({runs[0].name}); compare needs two or more")
    result = write_comparison(runs, out_dir, f"{len(runs)} runs compared", params.compare.noise_sds)
    best = result["winners"].get("fvu")
    fvu = next(r["metrics"]["fvu"] for r in result["runs"] if r["name"] == best) if best else None
    print(f"compare: {len(runs)} runs ({', '.join(r.name for r in runs)}); differing: "
          f"{', '.join(result['differing_params']) or 'nothing'}; best FVU {best} ({fvu:.4f}) -> "
          f"{out_dir / 'README.md'} [{time.perf_counter() - started:.1f} s]")


def compare_features(params: Params, runs: list[Run], a_name: str, b_name: str, out_dir: Path,
                     started: float) -> None:
    from saepipe.analysis.activation_db import ActivationDB
    from saepipe.sae.formats import load_sae

    a, b = _named(runs, [a_name, b_name], "finished run", "--features")
    cfg = params.compare
    with tempfile.TemporaryDirectory(prefix="saepipe-compare-") as scratch:
        sae_a, sae_b = (load_sae(r.sae.local(Path(scratch))) for r in (a, b))
        if sae_a.d_in != sae_b.d_in:
            raise UserError(f"--features: {a.name} takes {sae_a.d_in}-dimensional activations and {b.name} "
                            f"{sae_b.d_in}: their decoders live in different spaces")
        found = match_features(unit_rows(sae_a.W_dec), unit_rows(sae_b.W_dec), candidates=cfg.match_candidates,
                               split_cosine=cfg.split_cosine, progress=True)
        alive = np.setdiff1d(np.arange(sae_a.d_sae), np.asarray(a.dead or [], dtype=np.int64))
        correlation = None
        if a.activation_db and b.activation_db:
            with ActivationDB(a.activation_db.local(Path(scratch))) as db_a, \
                    ActivationDB(b.activation_db.local(Path(scratch))) as db_b:
                if _same_rows(db_a.attrs, db_b.attrs):
                    pairs = [i for i in range(sae_a.d_sae) if found.match[i] >= 0]
                    r = activation_correlation([db_a.feature_rows(i) for i in pairs],
                                               [db_b.feature_rows(int(found.match[i])) for i in pairs],
                                               int(db_a.attrs["n_rows"]))
                    correlation = np.full(sae_a.d_sae, np.nan)
                    correlation[pairs] = r
    summary = match_summary(a.name, b.name, sae_a.d_sae, sae_b.d_sae, found, alive, correlation,
                            METHOD.format(candidates=cfg.match_candidates))
    records = feature_records(found, correlation)
    target = write_match(out_dir / "features" / f"{a.name}--{b.name}", summary, records)
    if a.source == "workspace":
        analysis = Path(params.evaluate.output_dir)
        browser = (os.path.relpath(analysis / b.name / REPORT / "browser" / "index.html",
                                   analysis / a.name / REPORT / "browser")
                   if b.source == "workspace" and (analysis / b.name / REPORT).is_dir() else None)
        write_browser_matches(analysis / a.name / "matches", b.name, browser, summary, records)
    corr = f", mean activation r {summary['mean_correlation']:.3f}" if "mean_correlation" in summary else ""
    print(f"compare: {a.name} ({sae_a.d_sae:,}) against {b.name} ({sae_b.d_sae:,}): "
          f"{100 * summary['matched_0.9']:.1f} % of {summary['alive_a']:,} {'alive ' if a.dead is not None else ''}"
          f"latents matched at cosine >= 0.9, "
          f"{100 * summary['matched_0.7']:.1f} % at >= 0.7{corr} -> {target} [{time.perf_counter() - started:.1f} s]")


def _same_rows(a: dict, b: dict) -> bool:
    """Two activation DBs over the same tokens, row for row (the same cache, the same corpus)."""
    keys = ("n_rows", "activation_cache", "texts_sha256", "splits")
    return all(str(a.get(k)) == str(b.get(k)) for k in keys)
