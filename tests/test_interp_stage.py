"""Stage `interp` on the tiny model's run: probes on labelled documents, the token baseline, the tiny model as
LLM explainer, the outputs written as one folder and an explainer checked before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import with_section
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.autointerp import feature_examples
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import activation_db, analysis_dir, interp_dir
from saepipe.report.inputs import read_probing
from saepipe.report.markdown import interp_section
from saepipe.stages import activation_db as activation_db_stage
from saepipe.stages import interp, matrices, summarize

SUBJECTS = ["physics", "chemistry", "biology"]


def write_labels(params, n_documents: int, subject=None) -> None:
    labels = [{"subject": subject or SUBJECTS[d % 3], "chapter": subject or f"{SUBJECTS[d % 3]}_ch{d % 2}"}
              for d in range(n_documents)]
    with open(f"{params.process.output_dir}/labels.json", "w", encoding="utf-8") as handle:
        json.dump(labels, handle)


@pytest.fixture(scope="module")
def interp_params(trained_pipeline):
    params = with_section(trained_pipeline, "summarize", top_k=4, quantile_examples=2)
    params = with_section(params, "interp", features=2, score_examples=2, explain_examples=3, max_new_tokens=4,
                          batch_size=4, device="cpu", probe_k=[1, 2], probe_window=8,
                          explainer_model=params.base_model.output_dir)
    if not activation_db(params).is_file():
        activation_db_stage.run(params)
    matrices.run(params)
    summarize.run(params)
    write_labels(params, read_token_cache(params.tokenize.output).n_documents)
    interp.run(params)
    return params


def test_probing_metrics_are_flat_and_sized(interp_params) -> None:
    headline = json.loads((interp_dir(interp_params) / "probing.json").read_text())
    assert all(not isinstance(v, dict | list) for v in headline.values())  # flat, for `dvc exp show`
    assert not [k for k in headline if k.endswith(("_lo", "_hi", "_skipped", "_left_out")) or k == "procedure"]
    metrics = read_probing(interp_dir(interp_params))  # with the intervals and reasons probing_features.json keeps
    assert {k: metrics[k] for k in headline} == headline
    for key in ("subject_k1", "subject_k2", "subject_resid", "chapter_k1", "chapter_resid"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    assert metrics["subject_problems"] >= 1 and metrics["window"] == 8
    for key in ("subject_k1", "subject_k2", "subject_resid"):  # a scored task: each figure in its interval
        assert metrics[f"{key}_lo"] <= metrics[key] <= metrics[f"{key}_hi"], key
    assert metrics["subject_skipped"] is None
    with ActivationDB(activation_db(interp_params)) as db:
        docs = np.unique(db.row_doc)
        assert metrics["train_docs"] + metrics["val_docs"] == len(docs)
        windows = {(int(d), int(p) // 8) for d, p, o in zip(db.row_doc, db.row_position, db.row_outlier,
                                                           strict=True) if not o}
    assert metrics["train_samples"] + metrics["val_samples"] == len(windows)
    details = json.loads((interp_dir(interp_params) / "probing_features.json").read_text())
    problem = details["subject"]["problems"][0]
    assert [p["k"] for p in problem["probes"]] == [1, 2]
    assert len(problem["probes"][1]["features"]) == 2
    assert isinstance(problem["probes"][0]["features"][0]["top_tokens"], list)
    assert problem["probes"][0]["features"][0]["id"] == problem["probes"][1]["features"][0]["id"]  # nested top-k
    for probe in problem["probes"]:
        assert probe["interval"][0] <= probe["accuracy"] <= probe["interval"][1]
    assert sum(problem["validation_documents"]) == metrics["val_docs"]  # subjects: every held-out document
    assert all(isinstance(s["reason"], str) for task in ("subject", "chapter") for s in details[task]["skipped"])


def test_explanations_are_one_scored_line_per_feature_and_reproducible(interp_params) -> None:
    path = interp_dir(interp_params) / "explanations.jsonl"
    first = path.read_bytes()
    lines = [json.loads(line) for line in first.decode().splitlines()]
    assert [line["id"] for line in lines] == sorted(line["id"] for line in lines)
    records = [{"id": line["id"], **line["llm"]} for line in lines if "llm" in line]
    assert len(records) == 2
    for r in records:
        assert isinstance(r["explanation"], str) and 0.0 <= r["detection"] <= 1.0 and 0.0 <= r["fuzzing"] <= 1.0
        assert len(r["examples"]["explanation"]) == 3 + 2 * 2  # top examples, then the two quantile bands
        assert sum(e["activating"] for e in r["examples"]["detection"]) == 2
    auto = json.loads((interp_dir(interp_params) / "autointerp.json").read_text())
    assert auto["features"] == 2 and auto["judge"] == auto["explainer"] == interp_params.base_model.output_dir
    assert auto["detection"] == pytest.approx(np.mean([r["detection"] for r in records]), abs=1e-4)
    paired = [r["baseline_detection"] + r["baseline_fuzzing"] for r in records]
    llm = [r["detection"] + r["fuzzing"] for r in records]
    assert auto["beats_baseline"] == (np.mean(llm) > np.mean(paired))
    assert all(isinstance(r["baseline_explanation"], str) and "%" in r["baseline_explanation"] for r in records)
    probing = (interp_dir(interp_params) / "probing_features.json").read_bytes()
    interp.run(interp_params)
    assert path.read_bytes() == first  # greedy decoding, seeded examples
    assert (interp_dir(interp_params) / "probing_features.json").read_bytes() == probing  # seeded bootstrap


def test_held_out_windows_are_not_the_shown_ones(interp_params) -> None:
    tokenizer = load_tokenizer(interp_params.base_model.output_dir)
    lines = (analysis_dir(interp_params) / "feature_summaries.jsonl").read_text().splitlines()
    with ActivationDB(activation_db(interp_params), tokens=interp_params.tokenize.output, tokenizer=tokenizer) as db:
        f = int(np.argmax(db.counts))
        summary = json.loads(lines[f])
        examples = feature_examples(db, summary, 3, 4, (3, 1), seed=0)
        shown = {(e["doc"], e["position"]) for e in summary["top_examples"]}
        shown |= {(e["doc"], e["position"]) for band in summary["quantile_examples"].values() for e in band}
        assert len(examples.activating) == 4
        assert all(e.activation > 0 and (e.doc, e.position) not in shown for e in examples.activating)
        assert len(examples.non_activating) == 4 and all(not any(e.activations) for e in examples.non_activating)


def beside(interp_params, tmp_path):
    """Params whose labels and interp outputs go to tmp_path, reading the module's activation DB and summaries."""
    params = with_section(interp_params, "process", output_dir=str(tmp_path))
    params = with_section(params, "evaluate", output_dir=str(tmp_path / "analysis"))
    source = analysis_dir(interp_params)
    target = analysis_dir(params)
    target.mkdir(parents=True)
    for name in ("activation_db.h5", "feature_summaries.jsonl"):
        (target / name).symlink_to(source / name)
    return params


def test_a_one_subject_corpus_says_why_in_probing_json_and_the_report(interp_params, tmp_path) -> None:
    params = beside(interp_params, tmp_path)
    n = read_token_cache(params.tokenize.output).n_documents
    labels = [{"subject": "physics", "chapter": f"physics_ch{d % 2}"} for d in range(n)]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    interp.run(with_section(params, "interp", features=0))
    metrics = read_probing(interp_dir(params))
    reason = "the corpus has one subject only (physics)"
    assert metrics["subject_skipped"] == reason and metrics["subject_k1"] is None
    assert metrics["subject_problems"] == 0 and metrics["subject_left_out"] == 1
    details = json.loads((interp_dir(params) / "probing_features.json").read_text())
    assert details["subject"]["reason"] == reason and details["subject"]["problems"] == []
    assert details["subject"]["skipped"] == [
        {"class": "physics", "reason": "the only subject in the corpus: nothing to tell it apart from"}]
    readme = "\n".join(interp_section(metrics, None, {}))
    assert f"| subject | not scored: {reason} | | |\n" in readme  # the cells of k = 2 and the residual left empty


def test_unlabelled_corpus_skips_probing_and_zero_features_skips_explaining(interp_params, tmp_path) -> None:
    params = beside(interp_params, tmp_path)
    n = read_token_cache(params.tokenize.output).n_documents
    write_labels(params, n, subject="unknown")
    interp.run(with_section(params, "interp", features=0))
    assert "skipped" in json.loads((interp_dir(params) / "probing.json").read_text())
    lines = [json.loads(line) for line in (interp_dir(params) / "explanations.jsonl").read_text().splitlines()]
    assert lines and all("llm" not in line and line["token_baseline"] for line in lines)  # the baseline only
    assert json.loads((interp_dir(params) / "autointerp.json").read_text())["features"] == 0
    write_labels(params, n - 1)
    with pytest.raises(UserError, match=r"labels .* documents but the token cache holds"):
        interp.run(params)


def test_the_token_baseline_scores_every_alive_feature_it_can(interp_params) -> None:
    lines = (interp_dir(interp_params) / "explanations.jsonl").read_text().splitlines()
    records = [{"id": line["id"], "count": line["count"], **line["token_baseline"]} for line in map(json.loads, lines)
               if line["token_baseline"]]
    cfg = interp_params.interp
    with ActivationDB(activation_db(interp_params)) as db:
        can = set(np.flatnonzero(db.counts > cfg.score_examples).tolist())
        ids = [r["id"] for r in records]
        assert ids == sorted(ids) and set(ids) <= can and len(ids) >= 0.9 * len(can)
        for r in records:
            rows, _ = db.feature_rows(r["id"])
            tokens = db.row_token[rows]
            assert r["count"] == len(rows) and 1 <= len(r["tokens"]) <= cfg.top_tokens
            for t in r["tokens"]:  # its share of the firings the explanation was written from (all but held out)
                n = int((tokens == t["id"]).sum())
                kept = len(rows) - cfg.score_examples
                low, high = (n - cfg.score_examples) / kept, n / kept
                assert low - 1e-4 <= t["share"] <= high + 1e-4
            assert 0 <= r["detection"] <= 1 and 0 <= r["fuzzing"] <= 1 and 0 <= r["rarity"] <= 1
            assert r["score"] == pytest.approx((r["detection"] + r["fuzzing"]) / 2 * r["rarity"], abs=1e-4)
    auto = json.loads((interp_dir(interp_params) / "autointerp.json").read_text())
    assert auto["baseline_features"] == len(records)
    assert auto["baseline_detection"] == pytest.approx(np.mean([r["detection"] for r in records]), abs=1e-4)
    assert all(not isinstance(v, dict | list) for v in auto.values())  # flat, for `dvc exp show`


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_interrupted_run_keeps_the_old_folder_whole(interp_params, monkeypatch) -> None:
    folder = interp_dir(interp_params)
    before = tree(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(interp, "run_autointerp", interrupted)  # after probing and the baseline were written
    with pytest.raises(KeyboardInterrupt):
        interp.run(with_section(interp_params, "interp", probe_window=4, features=0))
    assert tree(folder) == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_an_unreachable_explainer_is_refused_before_any_work(interp_params, monkeypatch) -> None:
    folder = interp_dir(interp_params)
    before = tree(folder)

    def no_work(*args, **kwargs):
        raise AssertionError("the stage started working before checking its explainer")

    monkeypatch.setattr(interp, "run_probing", no_work)
    params = with_section(interp_params, "interp", explainer_url="http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match=r"interp\.explainer_url='http://127\.0\.0\.1:9/v1'.*reachable"):
        interp.run(params)
    with pytest.raises(UserError, match=r"interp\.explainer_model='no/such-model-here'"):
        interp.run(with_section(interp_params, "interp", explainer_model="no/such-model-here"))
    assert tree(folder) == before


def test_more_features_than_can_be_explained_is_clamped_with_a_note(interp_params, monkeypatch, capsys) -> None:
    asked = []

    def record(explainer, examples, *args, **kwargs):
        asked.append(len(examples))
        return []

    monkeypatch.setattr(interp, "interpret", record)
    interp.run(with_section(interp_params, "interp", features=100_000))
    err = capsys.readouterr().err
    with ActivationDB(activation_db(interp_params)) as db:
        cfg, summarize_cfg = interp_params.interp, interp_params.summarize
        shown = summarize_cfg.top_k + len(summarize_cfg.quantile_bands) * summarize_cfg.quantile_examples
        eligible = int((db.counts >= shown + cfg.score_examples).sum())
    assert asked == [eligible]
    assert f"interp.features=100000, but only {eligible} features fire often enough" in err
    interp.run(interp_params)  # back to the module's outputs
