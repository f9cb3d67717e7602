"""End to end: the repo's dvc.yaml in a temp git repo, on a tiny random model and a tiny corpus."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import h5py
import pytest
import yaml

from dvc_projects import BIN, git_commit, make_project, ran_stages, recipes, run
from saepipe import paths

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc is not installed")


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path, repo_dir: Path, tiny_training_text: list[str]) -> Path:
    return make_project(tmp_path / "project", repo_dir, tiny_model_dir, tiny_training_text)


def test_repro_runs_every_stage_then_only_what_a_code_edit_reaches(project: Path) -> None:
    first = run(["dvc", "repro"], project)
    assert ran_stages(first) == ["process", "base-model", "tokenize", "activations", "train", "export", "evaluate",
                                 "activation-db", "matrices", "summarize", "interp", "report"]
    assert not [line for line in first.splitlines() if "WARNING" in line]  # no empty-file deps, nothing to warn of

    texts = yaml.safe_load((project / "data/processed/texts.json").read_text())
    assert len(texts) == 9  # 3 chapters x (intro + 2 non-empty sections)
    assert not any("![" in t for t in texts)
    assert (project / "models/base/config.json").is_file()
    with h5py.File(project / "data/tokens.h5") as f:
        assert f.attrs["format"] == "saepipe.tokens"
        assert f["offsets"].shape == (len(texts) + 1,)
        assert f["split"].shape == (len(texts),)
        n_tokens = f["tokens"].shape[0]
    with h5py.File(project / "data/activations/activations.h5") as f:
        assert f.attrs["hook"] == "blocks.1.hook_resid_post"
        assert f.attrs["model_name"] == "tiny-random-llama"
        rows = f["train/activations"].shape[0] + f["validation/activations"].shape[0]
        assert rows == n_tokens - len(texts)  # every token but each document's position 0
        assert f["train/activations"].shape[1] == 64
        for name in ("token_ids", "doc_ids", "positions", "norms", "outlier"):
            assert f[f"train/{name}"].shape == (f["train/activations"].shape[0],)
        assert f["train/mean"].shape == (64,)
    metrics = run(["dvc", "metrics", "show", "--json"], project)
    # the detailed statistics are outputs in git, not metrics: `dvc exp show` lists the headline only
    assert "recompute_factor" not in metrics
    assert "recompute_factor" in (project / "data/activations/stats.json").read_text()
    assert '"documents"' not in metrics and "documents" in (project / "data/processed/stats.json").read_text()
    assert '"fvu"' in metrics and "val.fvu" not in metrics and "train.loss" not in metrics

    with h5py.File(project / "analysis/default/activation_db.h5") as f:
        assert f.attrs["n_rows"] == rows and f["csc/indptr"].shape == (129,)
    summaries = (project / "analysis/default/feature_summaries.jsonl").read_text().splitlines()
    assert len(summaries) == 128 and json.loads(summaries[0])["id"] == 0
    assert (project / "analysis/default/matrices/similarity_topk.npz").is_file()
    assert "mean_max_cosine" not in metrics
    assert "mean_max_cosine" in (project / "analysis/default/matrices_metrics.json").read_text()
    assert "subject_k1" in metrics and "subject_resid" in metrics and '"baseline_detection"' in metrics
    explained = [json.loads(line) for line in
                 (project / "analysis/default/interp/explanations.jsonl").read_text().splitlines()]
    assert len(explained) >= 2 and all("llm" not in e for e in explained)  # no LLM explainer named: the baseline
    assert all({"explanation", "detection", "fuzzing", "score"} <= set(e["token_baseline"]) for e in explained)
    report = project / "analysis/default/report"
    assert json.loads((report / "run_summary.json").read_text())["run_name"] == "default"
    assert (report / "plots/training_history.png").is_file() and (report / "browser/index.html").is_file()
    assert "training loss" in json.loads(run(["dvc", "plots", "show", "--json"], project))["data"]

    second = run(["dvc", "repro"], project)
    assert ran_stages(second) == []

    # each param change marks exactly the stage that reads it (what follows reruns on its changed outputs)
    original = (project / "params.yaml").read_text()
    for section, key, value, stage in [("train", "topk", 3, "train"), ("process", "min_words", 30, "process")]:
        set_param(project, section, key, value)
        assert set(json.loads(run(["dvc", "status", "--json"], project))) == {stage}, (section, key)
        (project / "params.yaml").write_text(original)

    set_param(project, "summarize", "top_k", 3)  # a summarize param reruns summarize and what reads its outputs
    assert ran_stages(run(["dvc", "repro"], project)) == ["summarize", "interp", "report"]
    assert len(json.loads((project / "analysis/default/feature_summaries.jsonl").read_text().splitlines()[0])
               ["top_examples"]) <= 3

    # code deps are layer folders (tests/test_dvc_deps.py): editing a module reruns the stages that use its
    # folder, and so does a module added to it, with no edit of dvc.yaml
    with (project / "src/saepipe/report/plots.py").open("a") as f:
        f.write("\n# edited\n")
    assert set(json.loads(run(["dvc", "status", "--json"], project))) == {"report"}
    (project / "src/saepipe/analysis/new_module.py").write_text('"""A new analysis."""\n')
    assert set(json.loads(run(["dvc", "status", "--json"], project))) == {
        "evaluate", "activation-db", "matrices", "summarize", "interp", "report"}


def test_only_flat_headline_files_are_metrics_and_the_details_stay_in_git(repo_dir: Path) -> None:
    """`dvc exp show` gives every key of every metrics file a column (329 on the default run when the corpus,
    cache, dvclive and matrices statistics were metrics): only the flat headline files are metrics now; the
    detailed files stay outputs kept in git (`cache: false`), versioned per experiment for compare and report."""
    stages = yaml.safe_load((repo_dir / "dvc.yaml").read_text())["stages"]

    def entries(kind: str) -> dict[tuple[str, str], dict]:
        found = {}
        for name, stage in stages.items():
            for item in stage.get(kind, []):
                path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                found[(name, Path(path).name)] = options
        return found

    assert set(entries("metrics")) == {("evaluate", paths.QUICK_HEADLINE), ("interp", paths.PROBING),
                                       ("interp", paths.AUTOINTERP)}
    outs = entries("outs")
    for kept in [("process", paths.CORPUS_STATS), ("activations", paths.ACTIVATION_STATS),
                 ("train", paths.LIVE_METRICS), ("evaluate", paths.QUICK_METRICS),
                 ("matrices", paths.MATRICES_METRICS)]:
        assert outs[kept] == {"cache": False}, kept


def test_a_corpus_outside_the_checkout_through_a_link_has_one_deps_column(project: Path, tmp_path: Path) -> None:
    """docs/experiments.md: DVC names an out-of-repo dep `../../x` in the workspace and `x` in a commit (two
    `dvc exp show` columns for one folder); a link inside the repo has one name in every row and still
    tracks the files behind it."""
    outside = tmp_path / "outside" / "corpus"
    outside.parent.mkdir()
    shutil.move(project / "data/raw", outside)
    (project / "data/corpus").symlink_to(outside)
    set_param(project, "process", "raw_dir", "data/corpus")
    assert ran_stages(run(["dvc", "repro", "process"], project)) == ["process"]
    git_commit(project, "the corpus through a link")
    set_param(project, "process", "min_words", 9)  # a workspace row beside the commit's
    rows = json.loads(run(["dvc", "exp", "show", "--json"], project))
    assert {row["rev"] for row in rows} >= {"workspace"} and len(rows) == 2
    deps = {name for row in rows for name in (row.get("data") or {}).get("deps", {})}
    assert {name for name in deps if "corpus" in name and not name.startswith("src/")} == {"data/corpus"}
    next((outside / "physics_chapters").glob("*.md")).write_text("# Chapter 1: Edited\n\n" + "word " * 20)
    assert "process" in json.loads(run(["dvc", "status", "--json"], project))


def stage_count(project: Path) -> int:
    """How many stages a first `dvc repro` runs: every stage of the project's dvc.yaml."""
    return len(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def repro_once(project: Path) -> None:
    assert len(ran_stages(run(["dvc", "repro"], project))) == stage_count(project)


@pytest.mark.slow
def test_param_changes_rerun_their_stage_and_what_reads_its_outputs(project: Path) -> None:
    repro_once(project)
    set_param(project, "activations", "outlier_factor", 5.0)
    third = run(["dvc", "repro", "activations"], project)
    assert ran_stages(third) == ["activations"]  # nothing upstream of it reruns
    with h5py.File(project / "data/activations/activations.h5") as f:
        assert f.attrs["outlier_factor"] == 5.0
    downstream = ["train", "export", "evaluate", "activation-db", "matrices", "summarize", "interp", "report"]
    assert ran_stages(run(["dvc", "repro"], project)) == downstream  # its output flows down

    set_param(project, "train", "topk", 3)
    assert ran_stages(run(["dvc", "repro"], project)) == downstream
    exported = json.loads((project / "models/sae/default/config.json").read_text())
    assert exported["d_in"] == 64 and exported["d_sae"] == 128
    assert exported["hook"] == "blocks.1.hook_resid_post"
    metrics = json.loads((project / "models/runs/default/live/metrics.json").read_text())
    assert {"fvu", "l0"} <= set(metrics["val"]) and "dead_feature_percentage" in metrics["train"]
    assert not (project / "dvclive").exists()
    quick = json.loads((project / "analysis/default/quick/metrics.json").read_text())
    assert quick["evaluated"]["hook"] == "blocks.1.hook_resid_post" and 0 < quick["ablation"]["tokens"] <= 128
    assert (project / "analysis/default/quick/feature_density.npy").is_file()
    assert "density_histogram.json" in run(["dvc", "plots", "show", "--json"], project)

    # a process param that changes the texts reruns everything after it, but not base-model
    set_param(project, "process", "min_words", 30)  # drops the chapters' short introductions
    assert ran_stages(run(["dvc", "repro"], project)) == ["process", "tokenize", "activations", *downstream]
    assert len(json.loads((project / "data/processed/texts.json").read_text())) == 6


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# ---- docs/experiments.md's Experiments and Sweeps recipes, exactly as typed ----------------------------------------
FORWARDS = re.compile(r"^activations: .* ([\d,]+) forward pass(?:es)?\b", re.MULTILINE)


EXPERIMENT_RECIPES = ["baseline", "adhoc", "experiment", "sweep", "sweep-compare"]
# Recipes of other pages, each run by its page's tests (test_many_models, test_remote_storage, test_base_model).
OTHER_RECIPES = ["many-models", "sharing", "reuse-base-model", "sharing-artifact", "remote-s3", "remote-gcs",
                 "remote-ssh"]


def experiment_recipes(repo_dir: Path) -> list[tuple[str, str]]:
    """The Experiments and Sweeps recipes, in reading order (the test below runs them in one project)."""
    return [(name, block) for name, block in recipes(repo_dir).items() if name in EXPERIMENT_RECIPES]


def run_recipe(block: str, cwd: Path) -> str:
    return run(["bash", "-euo", "pipefail", "-c", block], cwd)


def wait_for_queue(project: Path, timeout: float = 1800) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], project)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(5)


def exp_rows(project: Path) -> tuple[dict, dict[str, dict]]:
    """`dvc exp show --json` as (the HEAD baseline, its experiments by name), each row
    {"params": params.yaml's values, "metrics": {file: values}}."""

    def row(exp: dict) -> dict:
        data = exp.get("data") or {}
        return {"params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                "metrics": {path: value.get("data", {}) for path, value in (data.get("metrics") or {}).items()}}

    (baseline,) = [b for b in json.loads(run(["dvc", "exp", "show", "--json"], project)) if b["rev"] != "workspace"]
    return row(baseline), {e["name"]: row(e) for ex in baseline.get("experiments") or [] for e in ex["revs"]}


HEADLINE = "analysis/default/quick/headline.json"


def test_docs_names_its_recipes(repo_dir: Path) -> None:
    """Every recipe in README.md and docs/*.md has a test that runs it; the experiment recipes run in order."""
    assert [name for name, _ in experiment_recipes(repo_dir)] == EXPERIMENT_RECIPES
    every = recipes(repo_dir)
    assert sorted(every) == sorted(EXPERIMENT_RECIPES + OTHER_RECIPES)  # a new recipe needs a test that runs it


@pytest.mark.slow
def test_experiment_and_sweep_recipes(project: Path, repo_dir: Path) -> None:
    outputs: dict[str, str] = {}
    for name, block in experiment_recipes(repo_dir):
        outputs[name] = run_recipe(block, project)
        if "dvc queue start" in block:
            outputs[name] += wait_for_queue(project)

        if name == "baseline":
            assert len(ran_stages(outputs[name])) == stage_count(project)
        elif name == "adhoc":  # two derived names that differ in k, beside the untouched default run
            names = outputs[name].split()
            assert {"default", "tiny-random-llama.L1.resid_post.batch_topk.x2.k16",
                    "tiny-random-llama.L1.resid_post.batch_topk.x2.k64"} <= set(names)
            assert run(["git", "status", "--porcelain", "--untracked-files=no"], project) == ""
            assert "up to date" in run(["dvc", "status"], project)
        elif name == "experiment":
            baseline, rows = exp_rows(project)
            k64 = rows["k64-x16"]
            assert (k64["params"]["train"]["topk"], k64["params"]["train"]["sae_expansion"]) == (64, 16)
            headline = k64["metrics"][HEADLINE]
            assert set(headline) == {"fvu", "l0", "dead_pct", "ce_recovered", "kl"}  # flat: short columns
            assert all(isinstance(v, float) for v in headline.values())
            assert headline != baseline["metrics"][HEADLINE]
            table = outputs[name]
            assert all(column in table for column in ("k64-x16", "ce_recovered", "dead_pct", "train.topk"))
            assert "formulas" not in table and "sparsity.l0_mean" not in table
            assert "fvu" in (project / "experiments.csv").read_text().splitlines()[0]
            html = (project / "dvc_plots/index.html").read_text()
            assert "k64-x16" in html and "val/fvu.tsv" in html  # both revisions' curves in one plot
            assert yaml.safe_load((project / "params.yaml").read_text())["train"]["topk"] == 4  # baseline back
        elif name == "sweep":
            assert outputs[name].count("Success") == 3 and "Failed" not in outputs[name]

    _, rows = exp_rows(project)
    sweep = {name: row for name, row in rows.items() if name != "k64-x16"}
    assert sorted(row["params"]["train"]["topk"] for row in sweep.values()) == [16, 32, 64]
    assert all(row["params"]["train"]["sae_expansion"] == 2 for row in sweep.values())
    assert all(set(row["metrics"][HEADLINE]) >= {"fvu", "ce_recovered"} for row in sweep.values())
    assert all(name in outputs["sweep-compare"] for name in sweep)
    assert "val/fvu.tsv" in (project / "dvc_plots/index.html").read_text()
    # saepipe compare --experiments: every finished experiment (the sweep and k64-x16), read from DVC, one row each
    compared = json.loads((project / "analysis/compare/compare.json").read_text())
    assert sorted(r["name"] for r in compared["runs"]) == sorted(rows)
    assert all(r["source"] == "experiment" for r in compared["runs"])
    assert {"train.topk", "train.sae_expansion"} <= set(compared["differing_params"])
    for r in compared["runs"]:
        assert r["metrics"]["fvu"] == pytest.approx(rows[r["name"]]["metrics"][HEADLINE]["fvu"])
    assert (project / "analysis/compare/frontier.png").is_file()
    first, second = sorted(sweep)[:2]  # features matched across two experiments, read from the DVC cache
    run(["saepipe", "compare", "--features", first, second], project)
    summary = json.loads((project / f"analysis/compare/features/{first}--{second}/summary.json").read_text())
    assert summary["a"] == first and 0 <= summary["matched_0.7"] <= 1
    assert "mean_correlation" in summary  # both experiments' activation DBs, over the same rows
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project) == ""  # the workspace untouched

    # One pass of the base model over the corpus for the baseline, an experiment and a 3-config sweep: count
    # the activations stage's runs and its forward passes in every command's output and every queued log.
    logs = "".join(outputs.values()) + "".join(run(["dvc", "queue", "logs", name], project) for name in sweep)
    assert logs.count("Running stage 'activations'") == 1
    assert all("Stage 'activations' didn't change" in run(["dvc", "queue", "logs", name], project)
               for name in sweep)
    stats = json.loads((project / "data/activations/stats.json").read_text())
    assert [int(n.replace(",", "")) for n in FORWARDS.findall(logs)] == [stats["forward_passes"]]
    assert stats["forward_passes"] > 0
