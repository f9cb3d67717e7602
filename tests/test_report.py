"""Stage `report` on the tiny model's run: plots, run_summary.json, README.md, the browser, and its failures."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import saepipe
from helpers import with_section
from saepipe.analysis.activation_db import ActivationDB
from saepipe.cli import main
from saepipe.paths import activation_db, analysis_dir, evaluated_sae, report_dir, training_curves
from saepipe.report.markdown import interp_section
from saepipe.stages import activation_db as activation_db_stage
from saepipe.stages import evaluate, matrices, report, summarize

PLOTS = ("training_history", "l0_distribution", "feature_density", "ablation_ce_kl", "decoder_similarity",
         "cooccurrence_heatmap")


@pytest.fixture(scope="module")
def reported(trained_pipeline, tmp_path_factory):
    """Every analysis stage on the tiny run, in an analysis folder of this module's own, then the report."""
    root = tmp_path_factory.mktemp("report")
    params = with_section(trained_pipeline, "evaluate", output_dir=str(root / "analysis"))
    params = with_section(params, "summarize", top_k=4, context_before=3, context_after=1, quantile_examples=2)
    params = with_section(params, "report", table_features=3, table_examples=2, min_count=2, heatmap_features=8,
                          features_per_token=3, dpi=80)
    for stage in (evaluate, activation_db_stage, matrices, summarize, report):
        stage.run(params)
    return params


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def summaries(params) -> list[dict]:
    lines = (analysis_dir(params) / "feature_summaries.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_every_plot_is_a_readable_png(reported) -> None:
    from matplotlib.image import imread

    folder = report_dir(reported) / "plots"
    assert sorted(p.stem for p in folder.iterdir()) == sorted(PLOTS)
    for name in PLOTS:
        path = folder / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, name
        pixels = imread(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"


def test_run_summary_holds_the_inputs_figures(reported) -> None:
    summary = read(report_dir(reported) / "run_summary.json")
    history = read(evaluated_sae(reported) / "history.json")
    metrics = read(analysis_dir(reported) / "quick" / "metrics.json")
    matrices_metrics = read(analysis_dir(reported) / "matrices_metrics.json")

    assert summary["metrics"]["training"] == {"epochs": len(history), "final": history[-1]}
    for part in ("sparsity", "reconstruction", "ablation"):
        assert summary["metrics"]["evaluate"][part] == metrics[part]
    assert summary["metrics"]["matrices"] == matrices_metrics
    head = summary["headline"]
    assert head["fvu"] == metrics["reconstruction"]["fvu"]
    assert head["l0_mean"] == metrics["sparsity"]["l0_mean"]
    assert head["ce_loss_recovered"] == metrics["ablation"]["ce_loss_recovered"]
    assert head["kl_sae"] == metrics["ablation"]["kl_sae"]
    assert head["mean_max_cosine"] == matrices_metrics["mean_max_cosine"]
    assert head["mean_jaccard_top1"] == matrices_metrics["cooccurrence"]["mean_jaccard_top1"]
    assert (head["train_loss"], head["val_loss"]) == (history[-1]["loss"], history[-1]["val_loss"])

    assert summary["sae"]["d_sae"] == metrics["evaluated"]["d_sae"]
    assert summary["params"]["report"]["table_features"] == 3
    assert summary["params"]["training"]["topk"] == 4
    assert summary["versions"]["installed"]["saepipe"] == saepipe.__version__
    assert summary["versions"]["installed"]["torch"]
    for name, path in summary["artifacts"].items():
        assert Path(path).exists(), name
    assert summary["browser"]["features"] == metrics["evaluated"]["d_sae"]
    assert (report_dir(reported) / "browser" / "index.html").is_file()


def test_training_curves_are_a_dvc_plot_of_the_history(reported) -> None:
    history = read(evaluated_sae(reported) / "history.json")
    rows = read(training_curves(reported))
    assert [r["epoch"] for r in rows] == [e["epoch"] for e in history]
    assert [r["val_fvu"] for r in rows] == [e["val_fvu"] for e in history]
    assert [r["loss"] for r in rows] == [e["loss"] for e in history]


def test_l0_per_row_agrees_with_evaluate(reported) -> None:
    metrics = read(analysis_dir(reported) / "quick" / "metrics.json")
    with ActivationDB(activation_db(reported)) as db:
        l0, splits = db.row_l0()
        counted = db.attrs["counted_rows"]
    assert len(l0) == counted and l0.sum() == sum(s["count"] for s in summaries(reported))
    validation = l0[splits == 1]  # evaluate encodes the same validation rows with the same inference encode
    assert len(validation) == metrics["sparsity"]["tokens"]
    assert validation.mean() == pytest.approx(metrics["sparsity"]["l0_mean"], rel=1e-9)
    assert np.median(validation) == pytest.approx(metrics["sparsity"]["l0_median"])


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def test_readme_lists_the_features_the_heuristic_picks(reported) -> None:
    records = summaries(reported)
    cfg = reported.report
    active = [r["id"] for r in sorted((r for r in records if r["count"] > 0),
                                      key=lambda r: (-r["count"], r["id"]))][: cfg.table_features]
    readme = (report_dir(reported) / "README.md").read_text(encoding="utf-8")
    assert "`saepipe interp` has not run for this SAE: its token baseline ranks this table." in readme
    # the token baseline's scores decide the second table: a made-up baseline, ranked by its score x rarity
    alive = [r for r in records if r["count"] > 0]
    rng = np.random.default_rng(0)
    baseline = {r["id"]: {"id": r["id"], "explanation": "x", "tokens": [], "detection": 1.0, "fuzzing": 1.0,
                          "rarity": float(rng.random()), "count": r["count"]} for r in alive[::2]}
    for b in baseline.values():
        b["score"] = round(b["rarity"], 4)
    interp = analysis_dir(reported) / "interp"
    interp.mkdir()
    try:
        (interp / "explanations.jsonl").write_text("".join(
            json.dumps({"id": f, "count": b["count"], "token_baseline": b}) + "\n" for f, b in baseline.items()))
        report.run(reported)
        eligible = [r for r in records if r["id"] in baseline and r["count"] >= cfg.min_count]
        interpretable = [r["id"] for r in sorted(eligible, key=lambda r: (-baseline[r["id"]]["score"], -r["count"],
                                                                           r["id"]))][: cfg.table_features]
        assert active and interpretable
        readme = (report_dir(reported) / "README.md").read_text(encoding="utf-8")
        listed_active = [int(f) for f in re.findall(r"#feature=(\d+)", section(readme, "### Most active"))]
        listed_interp = [int(f) for f in re.findall(r"#feature=(\d+)", section(readme, "### Most interpretable"))]
        assert (listed_active, listed_interp) == (active, interpretable)
        assert "times the share-weighted rarity" in section(readme, "### Most interpretable")
        summary = read(report_dir(reported) / "run_summary.json")
        assert (summary["features"]["most_active"], summary["features"]["most_interpretable"]) == (active,
                                                                                                  interpretable)
        assert summary["features"]["most_interpretable_score"] == [baseline[f]["score"] for f in interpretable]
        for f in active + interpretable:  # each listed feature's strongest example, its token marked
            example = records[f]["top_examples"][0]
            assert f"«{example['tokens'][example['marked']].strip()}»" in readme
        for name in PLOTS:
            assert f"](plots/{name}.png)" in readme
        assert "| FVU |" in readme and "browser/index.html" in readme
    finally:
        shutil.rmtree(interp)
        report.run(reported)


def write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


@pytest.mark.parametrize("missing", ["feature_summaries.jsonl", "quick/metrics.json", "sae:history.json",
                                     "matrices/cooccurrence_topk.npz"])
def test_a_missing_input_exits_2_naming_the_file(reported, tmp_path, monkeypatch, capsys, missing) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the file below is the whole of the params
    file = write_params(reported, tmp_path / "params.yaml")
    base, _, name = missing.rpartition(":")
    path = (evaluated_sae(reported) if base else analysis_dir(reported)) / name
    before = (report_dir(reported) / "run_summary.json").read_bytes()
    path.rename(tmp_path / "kept")
    try:
        assert main(["report", "--params", str(file)]) == 2
    finally:
        (tmp_path / "kept").rename(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and err[0].startswith("saepipe report: error:")
    assert (report_dir(reported) / "run_summary.json").read_bytes() == before  # the old report is untouched


def test_an_interrupted_report_leaves_no_folder(reported, tmp_path, monkeypatch, capsys) -> None:
    import saepipe.report.build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saepipe.report.build, "write_browser", interrupted)
    monkeypatch.chdir(tmp_path)
    file = write_params(reported, tmp_path / "params.yaml")
    folder = report_dir(reported)
    before = (folder / "run_summary.json").read_bytes()
    assert main(["report", "--params", str(file)]) == 130  # over an existing report: it stays as it was
    assert (folder / "run_summary.json").read_bytes() == before
    shutil.move(folder, tmp_path / "kept")
    try:
        assert main(["report", "--params", str(file)]) == 130  # without one: none appears
        assert not folder.exists()
        assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".report")]
    finally:
        shutil.move(tmp_path / "kept", folder)
    assert "interrupted" in capsys.readouterr().err


def test_without_dense_matrices_the_plots_read_the_topk_files(reported, tmp_path) -> None:
    from saepipe.paths import COOCCURRENCE_TOPK, JACCARD, SIMILARITY, SIMILARITY_TOPK
    from saepipe.report import plots

    folder = analysis_dir(reported) / "matrices"
    for name in (SIMILARITY_TOPK, COOCCURRENCE_TOPK):  # what the matrices stage writes above dense_max_features
        shutil.copy(folder / name, tmp_path / name)
    with np.load(folder / COOCCURRENCE_TOPK) as data:
        ids = np.argsort(-data["fire_counts"], kind="stable")[:10]
        partners = data["ids"]
    dense = plots.cooccurrence_block(folder, JACCARD, COOCCURRENCE_TOPK, ids)
    sparse = plots.cooccurrence_block(tmp_path, JACCARD, COOCCURRENCE_TOPK, ids)
    listed = np.array([[j in partners[i] or i == j for j in ids] for i in ids])
    listed |= listed.T  # Jaccard is symmetric: a pair listed for either feature fills both cells
    assert np.allclose(sparse[listed], dense[listed]) and np.all(sparse[~listed] == 0)
    assert np.allclose(np.diag(dense), 1.0)

    edges = np.linspace(-1, 1, 41)
    counts, what = plots.pairwise_cosines(folder, SIMILARITY, SIMILARITY_TOPK, edges)
    d_sae = len(partners)
    assert counts.sum() == d_sae * (d_sae - 1) // 2 and what.startswith("all")
    top, what = plots.pairwise_cosines(tmp_path, SIMILARITY, SIMILARITY_TOPK, edges)
    with np.load(folder / SIMILARITY_TOPK) as data:
        assert top.sum() == data["values"].size and "nearest" in what


def test_without_the_ablation_pass_its_plot_is_left_out(reported) -> None:
    path = analysis_dir(reported) / "quick" / "metrics.json"
    original = path.read_text()
    metrics = json.loads(original)
    del metrics["ablation"]  # what evaluate writes with ablation_max_tokens: 0
    path.write_text(json.dumps(metrics))
    try:
        report.run(reported)
        folder = report_dir(reported)
        assert not (folder / "plots" / "ablation_ce_kl.png").exists()
        summary = read(folder / "run_summary.json")
        assert summary["headline"]["ce_loss_recovered"] is None and "plot_ablation" not in summary["artifacts"]
        assert "| CE loss recovered | — |" in (folder / "README.md").read_text()
    finally:
        path.write_text(original)
        report.run(reported)


def test_interp_results_reach_the_readme_browser_and_summary(reported, tmp_path) -> None:
    """What `saepipe interp` wrote (probing accuracies, scored explanations) shows in all three places."""
    readme = (report_dir(reported) / "README.md").read_text(encoding="utf-8")
    assert "`saepipe interp` has not run" in readme  # the module's report was built without it
    interp = analysis_dir(reported) / "interp"
    interp.mkdir()
    try:
        probing = {"subject_k1": 0.61, "subject_k1_lo": 0.4, "subject_k1_hi": 0.8, "subject_k5": 0.83,
                   "subject_k5_lo": 0.74, "subject_k5_hi": 0.88, "subject_resid": 0.97, "subject_resid_lo": 0.9,
                   "subject_resid_hi": 1.0, "chapter_k1": None, "chapter_k5": None, "chapter_resid": None,
                   "chapter_skipped": "every subject has one chapter only", "train_samples": 30, "val_samples": 8,
                   "train_docs": 9, "val_docs": 3, "window": 16}
        (interp / "probing.json").write_text(json.dumps(probing))
        (interp / "autointerp.json").write_text(json.dumps({
            "judge": "tiny", "baseline_features": 40, "baseline_detection": 0.66, "baseline_fuzzing": 0.71,
            "explainer": "tiny", "features": 2, "detection": 0.75, "fuzzing": 0.6, "paired_baseline_detection": 0.8,
            "paired_baseline_fuzzing": 0.7, "beats_baseline": False}))
        lines = [{"id": 3, "count": 9, "token_baseline": None,
                  "llm": {"explanation": "the word cell | in biology", "detection": 0.9, "fuzzing": 0.7,
                          "baseline_detection": 0.8, "baseline_fuzzing": 0.6, "examples": {"explanation": ["x"]}}},
                 {"id": 5, "count": 9, "token_baseline": None,
                  "llm": {"explanation": "units of force", "detection": 0.5, "fuzzing": None}}]
        (interp / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        report.run(reported)
        readme = (report_dir(reported) / "README.md").read_text(encoding="utf-8")
        assert "| subject | 0.61 [0.40, 0.80] | 0.83 [0.74, 0.88] | 0.97 [0.90, 1.00] |" in readme
        assert "| chapter | not scored: every subject has one chapter only | | |\n" in readme
        assert "8 held-out windows of 16 tokens from 9 and 3 documents" in readme
        assert "a 95 % interval from a bootstrap over the 3 held-out documents" in readme
        assert "the word cell \\| in biology | 0.9 | 0.7 | 0.8 / 0.6 |" in readme
        assert "units of force | 0.5 | — | — / — |" in readme
        assert "mean detection 0.75, fuzzing 0.6; on the same windows the token baseline scores 0.8 / 0.7: the " \
               "LLM's explanations **do not beat** it" in readme
        assert "Token baseline: each of 40 features" in readme and "mean detection 0.66, fuzzing 0.71" in readme
        summary = read(report_dir(reported) / "run_summary.json")
        assert summary["metrics"]["interp"]["probing"]["subject_k5"] == 0.83
        assert summary["metrics"]["interp"]["autointerp"]["detection"] == 0.75
        index = (report_dir(reported) / "browser" / "data" / "index.js").read_text(encoding="utf-8")
        assert "units of force" in index and "the word cell | in biology" in index
    finally:
        shutil.rmtree(interp)
        report.run(reported)


def test_probing_table_reads_files_without_intervals_and_counts_left_out_problems() -> None:
    """A probing.json from before the intervals still renders; left-out problems are counted, not hidden."""
    old = {"subject_k1": 0.61, "subject_k5": 0.83, "subject_resid": 0.97, "chapter_k1": 0.55, "chapter_k5": 0.64,
           "chapter_resid": 0.71, "train_samples": 30, "val_samples": 8, "window": None}
    text = "\n".join(interp_section(old, None, {}))
    assert "| subject | 0.61 | 0.83 | 0.97 |" in text and "| chapter | 0.55 | 0.64 | 0.71 |" in text
    assert "(30 training and 8 held-out documents; 0.5 is chance)" in text  # whole documents: no window
    assert "bootstrap" not in text  # no interval to explain
    text = "\n".join(interp_section({**old, "chapter_problems": 6, "chapter_left_out": 9}, None, {}))
    assert "chapter: mean over 6 problems, 9 left out" in text


@pytest.fixture
def labels_path(reported):
    """labels.json beside the tiny run's texts.json (absent unless interp's tests wrote one), put back after."""
    from saepipe.paths import labels_file

    path = labels_file(reported)
    before = path.read_bytes() if path.exists() else None
    yield path
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)
    report.run(reported)


def example_sources(readme: str, records: list[dict], listed: list[int], examples: int) -> list[tuple[dict, bool]]:
    """Each listed feature's example as the README's tables show it: (example, whether its line is there)."""
    return [(e, f"doc {e['doc']}, pos {e['position']})" in readme)
            for f in listed for e in records[f]["top_examples"][:examples]]


def test_examples_name_their_chapter_in_the_readme_and_browser(reported, labels_path) -> None:
    from saepipe.corpus.tokens import read_token_cache

    labels_path.unlink(missing_ok=True)  # a corpus without labels: document id and position only
    report.run(reported)
    folder, records = report_dir(reported), summaries(reported)
    listed = read(folder / "run_summary.json")["features"]["most_active"]
    readme = (folder / "README.md").read_text(encoding="utf-8")
    shown = example_sources(readme, records, listed, reported.report.table_examples)
    assert shown and all(found for _, found in shown)
    assert "documents" not in (folder / "browser" / "data" / "index.js").read_text(encoding="utf-8")

    n = read_token_cache(reported.tokenize.output).n_documents
    labels = [{"subject": "unknown", "chapter": "unknown"} if d % 4 == 3 else
              {"subject": "physics", "chapter": f"physics_ch{d % 3:02d}_units"} for d in range(n)]
    labels_path.write_text(json.dumps(labels))
    report.run(reported)
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for example, _ in shown:
        label = labels[example["doc"]]
        where = f"doc {example['doc']}, pos {example['position']})"
        if label["chapter"] == "unknown":
            assert f"; {where}" in readme
        else:  # escaped: a chapter's underscores would otherwise turn the cell italic
            assert f"; {label['chapter'].replace('_', chr(92) + '_')}, {where}" in readme
    assert "unknown" not in readme
    _, index = read_index(folder / "browser" / "data" / "index.js")
    table = index["documents"]
    assert table["names"] == sorted({label["chapter"] for label in labels} - {"unknown"})
    assert [table["names"][i] if i >= 0 else "unknown" for i in table["of"]] == [label["chapter"] for label in labels]


def read_index(path: Path) -> tuple[str, dict]:
    match = re.match(r'^SAEBrowser\.receive\("(\w+)",(.*)\);\n$', path.read_text(encoding="utf-8"), re.S)
    return match.group(1), json.loads(match.group(2))


def test_labels_of_another_corpus_exit_2_naming_the_file(reported, labels_path, tmp_path, monkeypatch,
                                                        capsys) -> None:
    from saepipe.corpus.tokens import read_token_cache

    n = read_token_cache(reported.tokenize.output).n_documents
    labels_path.write_text(json.dumps([{"subject": "physics", "chapter": "physics_ch01"}] * (n + 2)))
    monkeypatch.chdir(tmp_path)
    file = write_params(reported, tmp_path / "params.yaml")
    before = (report_dir(reported) / "run_summary.json").read_bytes()
    assert main(["report", "--params", str(file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(labels_path) in err[0] and f"{n + 2} documents" in err[0]
    assert (report_dir(reported) / "run_summary.json").read_bytes() == before  # the old report is untouched
