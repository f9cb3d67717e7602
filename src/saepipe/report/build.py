"""Put a run's report together in a folder: the plots, run_summary.json, README.md and the feature browser.

`write_report` writes into an empty folder (the stage's temporary directory); the stage renames it into
place only when everything is written, so an interrupted report leaves no folder that looks finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.analysis.activation_db import ActivationDB
from saepipe.paths import (
    COOCCURRENCE_TOPK,
    EXPLANATIONS,
    JACCARD,
    RUN_SUMMARY,
    SIMILARITY,
    SIMILARITY_TOPK,
)
from saepipe.report import plots
from saepipe.report.browser import write_browser
from saepipe.report.features import ACTIVE_RULE, INTERPRETABLE_RULE, concentration, most_active, most_interpretable
from saepipe.report.inputs import RunFiles, RunInputs, read_explanations
from saepipe.report.markdown import render_readme
from saepipe.report.run_summary import build_summary, headline_values, metric_sources
from saepipe.storage import read_npz, write_json

PLOTS = "plots"
README = "README.md"
BROWSER = "browser"
PAIRWISE_EDGES = np.linspace(-1.0, 1.0, 201)
LABEL_SHARE = 0.2
"""A heatmap label names a feature's top token only when that token takes at least this share of its firings:
below it the token says little of what the feature does (a feature spread over many tokens fires on " energy"
1 % of the time)."""
LABEL_RULE = f"labels: feature id, then its top token and that token's share of its firings where >= {LABEL_SHARE:.0%}"


@dataclass(frozen=True)
class ReportOptions:
    table_features: int
    min_count: int
    heatmap_features: int
    features_per_token: int
    dpi: int


def draw_plots(out: Path, inputs: RunInputs, files: RunFiles, db: ActivationDB, records: list[dict[str, Any]],
               options: ReportOptions) -> dict[str, Path]:
    """Every plot of the report into `out`, by name (the ablation plot only when evaluate ran the ablation)."""
    config, metrics = inputs.config, inputs.metrics
    who = f"{config['sae_type']} SAE ({config['d_sae']:,} features) on {config['model_name']} {config['hook']}"
    dpi = options.dpi
    drawn = {"training_history": plots.training_history(inputs.history, f"Training: {who}",
                                                        out / "training_history.png", dpi)}
    l0, splits = db.row_l0()
    drawn["l0_distribution"] = plots.l0_distribution(
        l0, splits, f"L0 per token over the activation DB ({len(l0):,} tokens)", out / "l0_distribution.png", dpi)
    sparsity = metrics["sparsity"]
    drawn["feature_density"] = plots.feature_density(
        inputs.density_histogram, int(inputs.dead["count"]), int(sparsity["tokens"]), int(config["d_sae"]),
        f"Feature density on {sparsity['tokens']:,} {metrics['evaluated']['split']} tokens",
        out / "feature_density.png", dpi)
    ablation = metrics.get("ablation")
    if ablation:
        drawn["ablation"] = plots.ablation_bars(
            ablation, f"Splicing the SAE into {config['model_name']} at {config['hook']} "
            f"({ablation['tokens']:,} predictions)", out / "ablation_ce_kl.png", dpi)
    pairs = plots.pairwise_cosines(files.matrices, SIMILARITY, SIMILARITY_TOPK, PAIRWISE_EDGES)
    drawn["decoder_similarity"] = plots.decoder_similarity(
        inputs.similarity_histogram, pairs, PAIRWISE_EDGES, f"Decoder similarity, {config['d_sae']:,} features",
        out / "decoder_similarity.png", dpi)
    fire_counts = read_npz(files.matrices / COOCCURRENCE_TOPK, ("fire_counts",), "matrices")["fire_counts"]
    frequent = np.argsort(-fire_counts, kind="stable")[: options.heatmap_features]
    frequent = frequent[fire_counts[frequent] > 0]
    if len(frequent) >= 2:
        block = plots.cooccurrence_block(files.matrices, JACCARD, COOCCURRENCE_TOPK, frequent)
        order = plots.cluster_order(block)
        labels = [heatmap_label(records[int(f)]) for f in frequent[order]]
        drawn["cooccurrence_heatmap"] = plots.cooccurrence_heatmap(
            block[np.ix_(order, order)], labels,
            f"Co-occurrence of the {len(frequent)} most frequent features (Jaccard index)\n{LABEL_RULE}",
            out / "cooccurrence_heatmap.png", dpi)
    return drawn


def heatmap_label(record: dict[str, Any]) -> str:
    """`#id`, and the top token with its share where that share reaches LABEL_SHARE (LABEL_RULE, in the title)."""
    share = concentration(record)
    if share < LABEL_SHARE:
        return f"#{record['id']}"
    token = record["top_tokens"][0]["token"]
    return f"#{record['id']} {token[:12]!r} {share:.0%}"  # repr: a newline or a space stays visible


def run_info(run_name: str, inputs: RunInputs) -> dict[str, Any]:
    """The small header the browser shows: what the SAE is and its headline figures."""
    config = inputs.config
    return {"run_name": run_name, **{k: config.get(k) for k in ("model_name", "hook", "sae_type", "d_in",
                                                                  "d_sae")},
            "headline": headline_values(metric_sources(inputs.history, inputs.metrics, inputs.matrices_metrics))}


def name_examples(records: list[dict[str, Any]], documents: Sequence[str | None]) -> None:
    """Give each of the records' examples its document's name (`document`) where it has one, for the README."""
    for record in records:
        for example in record["top_examples"]:
            name = documents[example["doc"]] if 0 <= example["doc"] < len(documents) else None
            if name:
                example["document"] = name


def write_report(out: Path, *, final: Path, run_name: str, inputs: RunInputs, files: RunFiles, db: ActivationDB,
                 records: list[dict[str, Any]], options: ReportOptions, params: dict[str, Any],
                 extra_artifacts: dict[str, str], documents: Sequence[str | None] = ()) -> dict[str, Any]:
    """Write the whole report into `out` (to be renamed to `final`); returns the run summary. `documents`:
    each document's subject and chapter by id (inputs.document_names), shown beside the examples."""
    (out / PLOTS).mkdir()
    name_examples(records, documents)
    drawn = draw_plots(out / PLOTS, inputs, files, db, records, options)
    info = run_info(run_name, inputs)
    explanations, baseline = read_explanations(files.interp / EXPLANATIONS)
    browser = write_browser(out / BROWSER, summaries=files.summaries, db=db, run_info=info,
                            features_per_token=options.features_per_token, explanations=explanations,
                            documents=documents)
    active = most_active(records, options.table_features)
    interpretable = most_interpretable(records, baseline, options.table_features, options.min_count)
    features = {
        "most_active": [r["id"] for r in active], "most_active_rule": ACTIVE_RULE,
        "most_interpretable": [r["id"] for r in interpretable],
        "most_interpretable_score": [r["baseline"]["score"] for r in interpretable],
        "most_interpretable_rule": INTERPRETABLE_RULE.format(min_count=options.min_count),
    }
    artifacts = {
        "report": str(final), "readme": str(final / README), "run_summary": str(final / RUN_SUMMARY),
        "browser": str(final / BROWSER / "index.html"),
        **{f"plot_{name}": str(final / PLOTS / path.name) for name, path in drawn.items()},
        "sae": str(files.sae), "activation_db": str(files.activation_db), "matrices": str(files.matrices),
        "feature_summaries": str(files.summaries), "evaluate": str(files.quick), **extra_artifacts,
    }
    if inputs.probing is not None or explanations:
        artifacts["interp"] = str(files.interp)
    summary = build_summary(run_name=run_name, config=inputs.config, history=inputs.history, metrics=inputs.metrics,
                            matrices_metrics=inputs.matrices_metrics, db_attrs=db.attrs, features=features,
                            params=params, artifacts=artifacts, browser=browser, probing=inputs.probing,
                            autointerp=inputs.autointerp)
    write_json(out / RUN_SUMMARY, summary)
    readme = render_readme(run_name=run_name, config=inputs.config, metrics=inputs.metrics,
                           headline=summary["headline"], db_rows=db.n_rows,
                           token_cache=db.attrs.get("token_cache"), epochs=len(inputs.history),
                           plots={name: f"{PLOTS}/{path.name}" for name, path in drawn.items()}, active=active,
                           interpretable=interpretable, min_count=options.min_count, browser_stats=browser,
                           baseline=bool(baseline), probing=inputs.probing, autointerp=inputs.autointerp,
                           explanations=explanations)
    (out / README).write_text(readme, encoding="utf-8")
    return summary


def curve_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training curves as DVC plot rows: epoch, then each panel's train and validation values."""
    keys = [name for key, _, _ in plots.TRAINING_PANELS for name in (key, f"val_{key}")]
    return [{"epoch": entry["epoch"], **{k: entry[k] for k in keys if k in entry}} for entry in history]
