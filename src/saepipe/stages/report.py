"""Stage `report`: a run's analyses -> `<evaluate.output_dir>/<SAE folder>/report/`, the last DVC stage.

Writes the folder in one piece (a temporary directory renamed when complete):

    plots/training_history.png     training and validation curves (the predecessor's name)
    plots/l0_distribution.png, feature_density.png, ablation_ce_kl.png, decoder_similarity.png,
         cooccurrence_heatmap.png
    run_summary.json               headline metrics, every stage's figures, params, versions, artifact paths
    README.md                      what was trained on what, metrics with meanings, plots, feature tables
    browser/index.html             the static feature browser (opens from disk, no server)

and beside it `training_curves.json` (a DVC plot: x epoch, train and validation curves).
"""

from __future__ import annotations

import time

from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.config import Params, flat_values
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import labels_file, report_dir, training_curves
from saepipe.report.build import README, ReportOptions, curve_rows, write_report
from saepipe.report.inputs import RunFiles, RunInputs, document_names, read_summaries
from saepipe.storage import atomic_dir, dir_size_bytes, write_json


@names_run
def run(params: Params) -> None:
    cfg = params.report
    started = time.perf_counter()
    files = RunFiles.of(params)
    inputs = RunInputs.read(files)
    with ActivationDB(files.activation_db) as db:  # a stale DB refused before the summaries and tokenizer load
        db.check_sae(files.sae)
    records = read_summaries(files.summaries, cfg.table_examples)
    documents = document_names(labels_file(params), params.tokenize.output)
    options = ReportOptions(table_features=cfg.table_features, min_count=cfg.min_count,
                            heatmap_features=cfg.heatmap_features, features_per_token=cfg.features_per_token,
                            dpi=cfg.dpi)
    out_dir, curves = report_dir(params), training_curves(params)
    tokenizer = load_tokenizer(params.base_model.output_dir)
    with ActivationDB(files.activation_db, tokenizer=tokenizer) as db:
        db.check_sae(files.sae)
        if db.d_sae != len(records):
            raise UserError(f"{files.summaries} holds {len(records):,} features, {files.activation_db} "
                            f"{db.d_sae:,}; rerun `saepipe summarize`")
        with atomic_dir(out_dir) as tmp:
            summary = write_report(tmp, final=out_dir, run_name=files.sae.name, inputs=inputs, files=files, db=db,
                                   records=records, options=options,
                                   params={"training": inputs.config.get("training"),
                                           "evaluated": inputs.metrics.get("evaluated"), "report": flat_values(cfg)},
                                   extra_artifacts={"training_curves": str(curves)}, documents=documents)
    write_json(curves, curve_rows(inputs.history))
    head, browser = summary["headline"], summary["browser"]
    n_plots = sum(name.startswith("plot_") for name in summary["artifacts"])
    print(f"report: {len(records):,} features; FVU {head['fvu']:.4g}, L0 {head['l0_mean']:.1f}, "
          f"dead {head['dead_feature_percentage']:.2f}% -> {out_dir / README}, {n_plots} plots, browser "
          f"{browser.get('files', 0):,} files ({dir_size_bytes(out_dir) / 2**20:,.1f} MiB in all) "
          f"[{time.perf_counter() - started:.1f} s]")
