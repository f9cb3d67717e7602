"""Stage `interp` on the tiny model's run: probes on labelled documents, the tiny model as explainer, outputs."""

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
                          batch_size=4, device="cpu", probe_k=[1, 2], probe_window=8)
    if not activation_db(params).is_file():
        activation_db_stage.run(params)
    matrices.run(params)
    summarize.run(params)
    write_labels(params, read_token_cache(params.tokenize.output).n_documents)
    interp.run(params)
    return params


def test_probing_metrics_are_flat_and_sized(interp_params) -> None:
    metrics = json.loads((interp_dir(interp_params) / "probing.json").read_text())
    for key in ("subject_k1", "subject_k2", "subject_resid", "chapter_k1", "chapter_resid"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    assert metrics["subject_problems"] >= 1 and metrics["window"] == 8
    for key in ("subject_k1", "subject_k2", "subject_resid"):  # a scored task: each figure in its interval
        assert metrics[f"{key}_lo"] <= metrics[key] <= metrics[f"{key}_hi"], key
    assert metrics["subject_skipped"] is None
    assert all(not isinstance(v, dict | list) for v in metrics.values())  # flat, for `dvc exp show`
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
    records = [json.loads(line) for line in first.decode().splitlines()]
    assert len(records) == 2 and records == sorted(records, key=lambda r: r["id"])
    for r in records:
        assert isinstance(r["explanation"], str) and 0.0 <= r["detection"] <= 1.0 and 0.0 <= r["fuzzing"] <= 1.0
        assert len(r["examples"]["explanation"]) == 3 + 2 * 2  # top examples, then the two quantile bands
        assert sum(e["activating"] for e in r["examples"]["detection"]) == 2
    auto = json.loads((interp_dir(interp_params) / "autointerp.json").read_text())
    assert auto["features"] == 2
    assert auto["detection"] == pytest.approx(np.mean([r["detection"] for r in records]), abs=1e-4)
    probing = (interp_dir(interp_params) / "probing.json").read_bytes()
    interp.run(interp_params)
    assert path.read_bytes() == first  # greedy decoding, seeded examples
    assert (interp_dir(interp_params) / "probing.json").read_bytes() == probing  # seeded bootstrap


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
    metrics = json.loads((interp_dir(params) / "probing.json").read_text())
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
    assert (interp_dir(params) / "explanations.jsonl").read_text() == ""
    assert json.loads((interp_dir(params) / "autointerp.json").read_text())["features"] == 0
    write_labels(params, n - 1)
    with pytest.raises(UserError, match=r"labels .* documents but the token cache holds"):
        interp.run(params)
