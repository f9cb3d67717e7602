"""Stage `interp`: sparse probes on the corpus's labels and scored feature explanations -> <analysis>/interp/,
written as one folder (under a temporary name, renamed when complete; an explainer is checked before any work).

    probing.json           DVC metrics: balanced held-out accuracy per task and k, the residual ceiling, sizes
    probing_features.json  per problem: the features each probe chose (with their top tokens), its accuracy
    explanations.jsonl     one line per feature: its token baseline (top tokens scored by the rule judge, every
                           alive feature) and, where an LLM explained it, the LLM's explanation, scores, the
                           baseline's scores on the same windows and the judged windows
    autointerp.json        DVC metrics: which judge, the token baseline's means, the LLM's means and whether they
                           beat the baseline
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from saepipe.activations.cache import ActivationCache
from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.autointerp import TOKEN_JUDGE, feature_examples, interpret, sample_features
from saepipe.analysis.explainer import Explainer, HTTPExplainer, LocalExplainer
from saepipe.analysis.probing import PROCEDURE, TaskResult, pooled_samples, probe_metrics, probe_tasks
from saepipe.analysis.summaries import top_tokens
from saepipe.analysis.token_baseline import paired_baseline, token_baseline
from saepipe.config import Params
from saepipe.corpus.labels import UNKNOWN, load_labels
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError
from saepipe.model.loading import resolve_device
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import (
    AUTOINTERP,
    EXPLANATIONS,
    PROBING,
    PROBING_FEATURES,
    activation_cache,
    activation_db,
    interp_dir,
    labels_file,
    summaries_file,
)
from saepipe.storage import atomic_dir, json_line, require_file, write_json, write_jsonl


def make_explainer(params: Params) -> Explainer | None:
    """The LLM explainer the params name, loaded or asked one question now, before any work; None without one
    (the token baseline alone) or with `features: 0`."""
    cfg = params.interp
    if not cfg.features or (cfg.explainer_url is None and cfg.explainer_model is None):
        return None
    if cfg.explainer_url:
        explainer = HTTPExplainer(cfg.explainer_url, cfg.explainer_model, cfg.explainer_api_key_env)
        explainer.check()
        return explainer
    return LocalExplainer(cfg.explainer_model, resolve_device(cfg.device, "interp.device"), cfg.batch_size)


def feature_tokens(db: ActivationDB, f: int, n: int) -> list[str]:
    rows, _ = db.feature_rows(f)
    return [t["token"] for t in top_tokens(db, rows, n)]


def probe_details(db: ActivationDB, tasks: list[TaskResult], n_tokens: int) -> dict[str, Any]:
    """probing_features.json: every problem's probes with the features they chose and those features' top tokens,
    each accuracy's bootstrap interval, and why a problem (or a whole task) was left out."""
    out: dict[str, Any] = {"procedure": PROCEDURE}
    for task in tasks:
        out[task.name] = {"reason": task.reason,
                          "skipped": [{"class": name, "reason": why} for name, why in task.skipped],
                          "problems": [
            {"class": p.name, "train": list(p.train), "validation": list(p.validation),
             "validation_documents": p.documents, "residual": p.residual,
             "residual_interval": p.interval(None),
             "probes": [{"k": k, "accuracy": p.accuracy[k], "interval": p.interval(k),
                         "features": [{"id": f, "top_tokens": feature_tokens(db, f, n_tokens)}
                                      for f in p.features[k]]} for k in p.accuracy]}
            for p in task.problems]}
    return out


def run_probing(params: Params, db: ActivationDB, doc_split: np.ndarray, labels: list[dict[str, str]],
                out_dir: Path) -> dict[str, Any]:
    cfg = params.interp
    if all(label["subject"] == UNKNOWN for label in labels):
        metrics = {"skipped": "the corpus has no subject/chapter labels (process.data_path)", "procedure": PROCEDURE}
        write_json(out_dir / PROBING, metrics)
        write_json(out_dir / PROBING_FEATURES, {"procedure": PROCEDURE})
        return metrics
    if not {0, 1} <= set(np.unique(db.row_split).tolist()):
        raise UserError(f"{db.path} holds only the {'train' if 0 in db.row_split else 'validation'} split; "
                        "probes need both: activation_db.splits=[train, validation]")
    with ActivationCache(activation_cache(params)) as cache:
        data = pooled_samples(db, cache, doc_split, labels, cfg.probe_window)
    tasks = probe_tasks(data, cfg.probe_k, cfg.probe_c, cfg.seed)
    docs = np.unique(db.row_doc)
    held = np.asarray(doc_split)[docs] == 1
    metrics = probe_metrics(data, tasks, cfg.probe_k, cfg.probe_window, (int((~held).sum()), int(held.sum())))
    write_json(out_dir / PROBING_FEATURES, {**probe_details(db, tasks, cfg.top_tokens), "figures": metrics})
    write_json(out_dir / PROBING, probing_headline(metrics))
    return metrics


def probing_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """probing.json, the DVC metrics: the accuracies and sizes only, so `dvc exp show` stays readable; their
    intervals, the reasons and the procedure are in probing_features.json's "figures"."""
    detail = ("_lo", "_hi", "_left_out", "_skipped")
    return {k: v for k, v in metrics.items() if not k.endswith(detail) and k != "procedure"}


def read_summaries(path: Path, ids: list[int]) -> list[dict[str, Any]]:
    """The summary lines of `ids` (line f is feature f), read without parsing the others."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; run `saepipe summarize` first")
    wanted, found, last = set(ids), {}, max(ids, default=-1)
    with open(path, "rb") as handle:
        for f, line in enumerate(handle):
            if f > last:  # the file runs to tens of MB: stop after the last line wanted
                break
            if f in wanted:
                summary = json_line(path, f + 1, line, "summarize")
                if summary.get("id") != f:
                    raise UserError(f"{path}: line {f + 1} is not feature {f}; rerun `saepipe summarize`")
                found[f] = summary
    if len(found) != len(wanted):
        raise UserError(f"{path} ends before feature {max(wanted - set(found))}; rerun `saepipe summarize`")
    return [found[f] for f in ids]


def run_token_baseline(params: Params, db: ActivationDB) -> list[dict[str, Any]]:
    cfg, summarize = params.interp, params.summarize
    with tqdm(total=int((db.counts > 0).sum()), desc="interp: token baseline", unit="feature") as bar:
        return token_baseline(db, (summarize.context_before, summarize.context_after), cfg.score_examples,
                              cfg.top_tokens, cfg.seed, bar)


def explanation_records(baseline: list[dict[str, Any]], llm: list[dict[str, Any]], counts: np.ndarray
                        ) -> list[dict[str, Any]]:
    """explanations.jsonl: one line per feature the token baseline scored or the LLM explained, in id order,
    with each one's part ("token_baseline", "llm"; null or absent where it did not)."""
    lines = {r["id"]: {"id": r["id"], "count": r["count"],
                       "token_baseline": {k: v for k, v in r.items() if k not in ("id", "count")}} for r in baseline}
    for r in llm:
        line = lines.setdefault(r["id"], {"id": r["id"], "count": int(counts[r["id"]]), "token_baseline": None})
        line["llm"] = {k: v for k, v in r.items() if k != "id"}
    return [lines[f] for f in sorted(lines)]


def run_autointerp(params: Params, db: ActivationDB, explainer: Explainer | None, out_dir: Path) -> dict[str, Any]:
    cfg, summarize = params.interp, params.summarize
    baseline = run_token_baseline(params, db)
    records: list[dict[str, Any]] = []
    if explainer is not None:
        shown = summarize.top_k + len(summarize.quantile_bands) * summarize.quantile_examples
        ids = sample_features(db.counts, cfg.features, shown, cfg.score_examples, cfg.seed)
        if len(ids) < cfg.features:
            print(f"interp: interp.features={cfg.features}, but only {len(ids)} features fire often enough "
                  f"({shown + cfg.score_examples}+ times) to show {shown} examples and hold out {cfg.score_examples}: "
                  f"explaining {len(ids)}", file=sys.stderr)
        context = (summarize.context_before, summarize.context_after)
        examples = [feature_examples(db, s, cfg.explain_examples, cfg.score_examples, context, cfg.seed)
                    for s in read_summaries(summaries_file(params), ids)]
        baselines = [paired_baseline(db, e, cfg.top_tokens) for e in examples]
        with tqdm(total=len(examples), desc="interp: explain and score", unit="feature") as bar:
            records = interpret(explainer, examples, cfg.max_new_tokens, cfg.seed, baselines, bar, chunk=cfg.batch_size)
    write_jsonl(out_dir / EXPLANATIONS, explanation_records(baseline, records, db.counts))
    metrics = autointerp_metrics(baseline, records, explainer.name if explainer else None)
    write_json(out_dir / AUTOINTERP, metrics)
    return metrics


def autointerp_metrics(baseline: list[dict[str, Any]], records: list[dict[str, Any]], explainer: str | None
                       ) -> dict[str, Any]:
    """autointerp.json (flat, for `dvc exp show`): the token baseline over every feature it scored; with an
    LLM explainer, its means, the baseline's on the same windows, and whether the LLM beat it."""
    metrics: dict[str, Any] = {"judge": explainer or TOKEN_JUDGE, "baseline_features": len(baseline)}
    metrics.update({f"baseline_{key}": _mean(baseline, key) for key in ("detection", "fuzzing")})
    metrics.update({"explainer": explainer, "features": len(records)})
    metrics.update({key: _mean(records, key) for key in ("detection", "fuzzing", "detection_auc", "fuzzing_auc")})
    metrics.update({f"paired_baseline_{key}": _mean(records, f"baseline_{key}") for key in ("detection", "fuzzing")})
    metrics["beats_baseline"] = None if not records else bool(
        metrics["detection"] + metrics["fuzzing"] > metrics["paired_baseline_detection"]
        + metrics["paired_baseline_fuzzing"])
    return metrics


@names_run
def run(params: Params) -> None:
    started = time.perf_counter()
    out_dir = interp_dir(params)
    tokens = read_token_cache(params.tokenize.output)
    labels = load_labels(labels_file(params), tokens.n_documents)
    require_file(summaries_file(params), "feature summaries", "run `saepipe summarize` first")
    explainer = make_explainer(params)
    tokenizer = load_tokenizer(params.base_model.output_dir)
    with ActivationDB(activation_db(params), tokens=tokens, tokenizer=tokenizer) as db, \
            atomic_dir(out_dir, keep=(".gitignore",)) as tmp:
        probing = run_probing(params, db, tokens.split, labels, tmp)
        auto = run_autointerp(params, db, explainer, tmp)
    ks = params.interp.probe_k
    probes = "probing skipped (no labels)" if "skipped" in probing else (
        ", ".join(f"{task} not scored ({probing[f'{task}_skipped']})" if probing.get(f"{task}_skipped") else
                  f"{task} " + "/".join(_fmt(probing[f"{task}_k{k}"]) for k in ks) + f" (resid "
                  f"{_fmt(probing[f'{task}_resid'])})" for task in ("subject", "chapter"))
        + f" at k={'/'.join(map(str, ks))}")
    llm = "" if not auto["features"] else (
        f"; {auto['features']} explained by {auto['explainer']}: detection {_fmt(auto['detection'])}, fuzzing "
        f"{_fmt(auto['fuzzing'])} ({'beats' if auto['beats_baseline'] else 'does not beat'} the token baseline's "
        f"{_fmt(auto['paired_baseline_detection'])}/{_fmt(auto['paired_baseline_fuzzing'])} on the same windows)")
    print(f"interp: {probes}; token baseline on {auto['baseline_features']} features: detection "
          f"{_fmt(auto['baseline_detection'])}, fuzzing {_fmt(auto['baseline_fuzzing'])}{llm} -> {out_dir} "
          f"[{time.perf_counter() - started:.1f} s]")


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    return round(float(np.mean([r[key] for r in records])), 4) if records else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
