"""Stage `interp`: sparse probes on the corpus's labels and scored feature explanations -> <analysis>/interp/.

    probing.json           DVC metrics: balanced held-out accuracy per task and k, the residual ceiling, sizes
    probing_features.json  per problem: the features each probe chose (with their top tokens), its accuracy
    explanations.jsonl     one JSON object per explained feature: id, explanation, detection, fuzzing, examples
    autointerp.json        DVC metrics: mean detection and fuzzing scores, features explained, the explainer
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from saepipe.activations.cache import ActivationCache
from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.analysis.autointerp import feature_examples, interpret, sample_features
from saepipe.analysis.explainer import Explainer, HTTPExplainer, LocalExplainer
from saepipe.analysis.probing import PROCEDURE, TaskResult, pooled_samples, probe_metrics, probe_tasks
from saepipe.analysis.summaries import top_tokens
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
from saepipe.storage import atomic_path, json_line, write_json


def make_explainer(params: Params) -> Explainer:
    cfg = params.interp
    if cfg.explainer_url:
        return HTTPExplainer(cfg.explainer_url, cfg.explainer_model, cfg.explainer_api_key_env)
    model = cfg.explainer_model or params.base_model.output_dir
    if cfg.explainer_model is None and not Path(model).is_dir():
        raise UserError(f"base model directory not found: {model} (run `saepipe base-model` first)")
    return LocalExplainer(model, resolve_device(cfg.device, "interp.device"), cfg.batch_size)


def feature_tokens(db: ActivationDB, f: int, n: int) -> list[str]:
    rows, _ = db.feature_rows(f)
    return [t["token"] for t in top_tokens(db, rows, n)]


def probe_details(db: ActivationDB, tasks: list[TaskResult], n_tokens: int) -> dict[str, Any]:
    """probing_features.json: every problem's probes with the features they chose and those features' top tokens."""
    out: dict[str, Any] = {"procedure": PROCEDURE}
    for task in tasks:
        out[task.name] = {"skipped": task.skipped, "problems": [
            {"class": p.name, "train": list(p.train), "validation": list(p.validation), "residual": p.residual,
             "probes": [{"k": k, "accuracy": p.accuracy[k],
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
    tasks = probe_tasks(data, cfg.probe_k, cfg.probe_c)
    docs = np.unique(db.row_doc)
    held = np.asarray(doc_split)[docs] == 1
    metrics = probe_metrics(data, tasks, cfg.probe_k, cfg.probe_window, (int((~held).sum()), int(held.sum())))
    write_json(out_dir / PROBING_FEATURES, probe_details(db, tasks, cfg.top_tokens))
    write_json(out_dir / PROBING, metrics)
    return metrics


def read_summaries(path: Path, ids: list[int]) -> list[dict[str, Any]]:
    """The summary lines of `ids` (line f is feature f), read without parsing the others."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; run `saepipe summarize` first")
    wanted, found = set(ids), {}
    with open(path, "rb") as handle:
        for f, line in enumerate(handle):
            if f in wanted:
                summary = json_line(path, f + 1, line, "summarize")
                if summary.get("id") != f:
                    raise UserError(f"{path}: line {f + 1} is not feature {f}; rerun `saepipe summarize`")
                found[f] = summary
    if len(found) != len(wanted):
        raise UserError(f"{path} ends before feature {max(wanted - set(found))}; rerun `saepipe summarize`")
    return [found[f] for f in ids]


def run_autointerp(params: Params, db: ActivationDB, out_dir: Path) -> dict[str, Any]:
    cfg, summarize = params.interp, params.summarize
    shown = summarize.top_k + len(summarize.quantile_bands) * summarize.quantile_examples
    ids = sample_features(db.counts, cfg.features, shown, cfg.score_examples, cfg.seed)
    records: list[dict[str, Any]] = []
    explainer_name = None
    if ids:
        explainer = make_explainer(params)
        explainer_name = explainer.name
        context = (summarize.context_before, summarize.context_after)
        examples = [feature_examples(db, s, cfg.explain_examples, cfg.score_examples, context, cfg.seed)
                    for s in read_summaries(summaries_file(params), ids)]
        with tqdm(total=len(examples), desc="interp: explain and score", unit="feature") as bar:
            records = interpret(explainer, examples, cfg.max_new_tokens, cfg.seed, bar, chunk=cfg.batch_size)
    with atomic_path(out_dir / EXPLANATIONS) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = {key: _mean(records, key) for key in ("detection", "fuzzing", "detection_auc", "fuzzing_auc")}
    metrics.update(features=len(records), explainer=explainer_name)
    write_json(out_dir / AUTOINTERP, metrics)
    return metrics


@names_run
def run(params: Params) -> None:
    started = time.perf_counter()
    out_dir = interp_dir(params)
    tokenizer = load_tokenizer(params.base_model.output_dir)
    tokens = read_token_cache(params.tokenize.output)
    labels = load_labels(labels_file(params), tokens.n_documents)
    with ActivationDB(activation_db(params), tokens=tokens, tokenizer=tokenizer) as db:
        probing = run_probing(params, db, tokens.split, labels, out_dir)
        auto = run_autointerp(params, db, out_dir)
    ks = params.interp.probe_k
    probes = "probing skipped (no labels)" if "skipped" in probing else (
        ", ".join(f"{task} " + "/".join(_fmt(probing[f"{task}_k{k}"]) for k in ks) + f" (resid "
                  f"{_fmt(probing[f'{task}_resid'])})" for task in ("subject", "chapter"))
        + f" at k={'/'.join(map(str, ks))}")
    print(f"interp: {probes}; {auto['features']} features explained, detection {_fmt(auto['detection'])}, "
          f"fuzzing {_fmt(auto['fuzzing'])} -> {out_dir} [{time.perf_counter() - started:.1f} s]")


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    return round(float(np.mean([r[key] for r in records])), 4) if records else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
