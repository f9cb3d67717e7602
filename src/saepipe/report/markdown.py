"""The report's README.md: what was trained on what, the headline metrics with their meanings, the plots,
and tables of the most active and the most interpretable-looking features with their top examples inline."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from saepipe.analysis.autointerp import TOKEN_JUDGE
from saepipe.report.features import ACTIVE_RULE, INTERPRETABLE_RULE
from saepipe.report.run_summary import HEADLINES

BROWSER = "browser/index.html"
_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")
PLOT_CAPTIONS = {
    "training_history": "Training (blue) and validation (orange) curves per epoch, from the export's history.json.",
    "l0_distribution": "Features active per token over the activation DB's tokens, per split; dashed lines: means.",
    "feature_density": "How often each feature fires (log10 of the fraction of tokens), dead features in red.",
    "ablation": "Next-token loss and KL from the clean run with the hook clean, spliced with the SAE's "
                "reconstruction, zeroed and replaced by its mean.",
    "decoder_similarity": "Cosine similarity between decoder directions: nearest neighbour per feature, and all "
                          "pairs.",
    "cooccurrence_heatmap": "Jaccard index of the tokens the most frequent features fire on, clustered so that "
                            "features firing together sit together.",
}


def escape(text: str) -> str:
    """Text safe inside a Markdown table cell: special characters escaped, line breaks shown as ⏎."""
    return _SPECIAL.sub(r"\\\1", text).replace("\r", "").replace("\n", "⏎").replace("\t", " ")


def example_text(example: dict[str, Any]) -> str:
    """An example's window with the activating token in bold between «» (readable without formatting), then
    its activation and where it is: the document's subject and chapter where known, its id and position."""
    tokens = example["tokens"]
    marked = example["marked"]
    before = escape("".join(tokens[:marked]))
    after = escape("".join(tokens[marked + 1 :]))
    token = tokens[marked]
    word = token.strip()
    lead = token[: len(token) - len(token.lstrip())]  # a leading space stays outside the bold, as text
    where = f"{escape(example['document'])}, " if example.get("document") else ""
    return (f"…{before}{escape(lead)}**«{escape(word) or '␣'}»**{after}… ({example['activation']:.3g}; {where}"
            f"doc {example['doc']}, pos {example['position']})")


def _value(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def headline_table(headline: dict[str, Any]) -> list[str]:
    lines = ["| metric | value | what it means |", "|---|---|---|"]
    for h in HEADLINES:
        lines.append(f"| {h.label} | {_value(headline.get(h.name), h.spec)} | {h.meaning} |")
    return lines


def token_cell(token: dict[str, Any], count: int) -> str:
    """A top token with its share of the feature's firings and, where known, the share of the token's own
    occurrences the feature fires on (a common token can hold many firings yet say little)."""
    cell = f"\"{escape(token['token'])}\" {token['count'] / count:.0%}"
    return cell + (f" / {token['token_share']:.0%}" if token.get("token_share") is not None else "")


def feature_table(records: Sequence[dict[str, Any]], tokens: int, with_baseline: bool) -> list[str]:
    header = ("| feature | fires on | max | top tokens (share of its firings / of the token's occurrences) | "
              "top examples (activation) |")
    lines = [header, "|---|---|---|---|---|"]
    for r in records:
        top = ", ".join(token_cell(t, r["count"]) for t in r["top_tokens"][:3])
        fires = f"{r['count']:,} tokens ({r['density']:.2%})"
        if with_baseline:
            b = r["baseline"]
            fires += (f"; score {b['score']:.2f} (detection {b['detection']:.2f}, fuzzing {b['fuzzing']:.2f}, "
                      f"rarity {b['rarity']:.2f})")
        examples = "<br>".join(example_text(e) for e in r["top_examples"])
        lines.append(f"| [#{r['id']}]({BROWSER}#feature={r['id']}) | {fires} | {r['max']:.3g} | {top} | {examples} |")
    return lines


def render_readme(*, run_name: str, config: dict[str, Any], metrics: dict[str, Any], headline: dict[str, Any],
                  db_rows: int, token_cache: str | None, epochs: int, plots: dict[str, str],
                  active: Sequence[dict[str, Any]], interpretable: Sequence[dict[str, Any]], min_count: int,
                  browser_stats: dict[str, Any], baseline: bool = False, probing: dict[str, Any] | None = None,
                  autointerp: dict[str, Any] | None = None,
                  explanations: dict[int, dict[str, Any]] | None = None) -> str:
    evaluated = metrics.get("evaluated", {})
    data = config.get("data", {})
    checkpoint = config.get("checkpoint", {})
    tokens = metrics.get("sparsity", {}).get("tokens", 0)
    k = f", k = {config['k']}" if config.get("k") is not None else ""
    lines = [
        f"# SAE report: {run_name}",
        "",
        f"A **{config.get('sae_type')}** sparse autoencoder with **{config.get('d_sae'):,} features**{k} on "
        f"**{config.get('model_name')}**'s `{config.get('hook')}` (d_in {config.get('d_in')}), trained for "
        f"{epochs} epoch{'s' if epochs != 1 else ''} on {data.get('train_rows', 0):,} cached activations "
        f"({data.get('validation_rows', 0):,} held out) from `{data.get('activation_cache')}` (the corpus tokenized "
        f"in `{token_cache}`). The exported "
        f"checkpoint is `{checkpoint.get('name')}` (epoch {checkpoint.get('epoch')}, "
        f"{checkpoint.get('tokens_seen', 0):,} tokens seen). Evaluated on {tokens:,} {evaluated.get('split')} "
        f"tokens of {evaluated.get('documents')} documents; the activation DB covers {db_rows:,} tokens.",
        "",
        f"**Feature browser:** open [{BROWSER}]({BROWSER}) in a browser (from disk, no server needed): "
        f"{browser_stats.get('features', 0):,} features, sortable and searchable, with every top example.",
        "",
        "## Headline metrics",
        "",
        *headline_table(headline),
        "",
        "Every figure, with the formulas, is in `run_summary.json` and the stages' own metrics files.",
        "",
        "## Plots",
        "",
    ]
    for name, path in plots.items():
        lines += [f"![{name.replace('_', ' ')}]({path})", "", PLOT_CAPTIONS.get(name, ""), ""]
    lines += [
        "## Features",
        "",
        "Examples show the activating token in bold between «»; ⏎ is a line break. Feature numbers link to the "
        "browser's page for the feature.",
        "",
        f"### Most active ({len(active)})",
        "",
        f"Selected as {ACTIVE_RULE}.",
        "",
        *feature_table(active, tokens, with_baseline=False),
        "",
        f"### Most interpretable-looking ({len(interpretable)})",
        "",
        f"Selected by {INTERPRETABLE_RULE.format(min_count=min_count)}.",
        "",
        *(feature_table(interpretable, tokens, with_baseline=True) if interpretable else
          [f"No feature scored by the token baseline fires at least {min_count} times (`report.min_count`)."]
          if baseline else ["`saepipe interp` has not run for this SAE: its token baseline ranks this table."]),
        "",
        *interp_section(probing, autointerp, explanations or {}),
    ]
    return "\n".join(lines)


def _score(value: Any) -> str:
    return "—" if value is None else f"{value:.3g}"


def _accuracy(probing: dict[str, Any], key: str) -> str:
    """`0.81 [0.74, 0.88]`: a probing accuracy with its bootstrap interval (the value alone in older files)."""
    value, lo, hi = (probing.get(key + suffix) for suffix in ("", "_lo", "_hi"))
    if value is None:
        return "—"
    return f"{value:.2f}" if lo is None or hi is None else f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def probing_table(probing: dict[str, Any]) -> list[str]:
    """probing.json as a table: accuracy [95 % interval] per task and k; a task without a figure shows why."""
    ks = sorted(int(m.group(1)) for key in probing if (m := re.fullmatch(r"subject_k(\d+)", key)))
    window, docs = probing.get("window"), probing.get("val_docs")
    sizes = f"{probing.get('train_samples')} training and {probing.get('val_samples')} held-out " + (
        "documents" if window is None else f"windows of {window} tokens"
        + ("" if docs is None else f" from {probing.get('train_docs')} and {docs} documents"))
    intervals = any(key.endswith("_lo") for key in probing)
    lines = [f"Sparse probing: held-out balanced accuracy of a logistic-regression probe on the k SAE features "
             f"with the largest class-mean difference, against the same probe on all residual dimensions "
             f"({sizes}; 0.5 is chance)."
             + (f" In brackets, a 95 % interval from a bootstrap over the {docs} held-out "
                "documents (resampled with replacement, the probes' predictions kept): few held-out documents "
                "give wide intervals, though a class held out in a single document cannot vary in them."
                if intervals else ""), "",
             "| task | " + " | ".join(f"k = {k}" for k in ks) + " | residual (all dims) |",
             "|---|" + "---|" * (len(ks) + 1)]
    notes = []
    for task in ("subject", "chapter"):
        if probing.get(f"{task}_skipped"):
            lines.append(f"| {task} | not scored: {escape(probing[f'{task}_skipped'])} |" + " |" * len(ks))
            continue
        cells = [_accuracy(probing, f"{task}_k{k}") for k in ks] + [_accuracy(probing, f"{task}_resid")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
        if probing.get(f"{task}_left_out"):
            notes.append(f"{task}: mean over {probing.get(f'{task}_problems')} problems, "
                         f"{probing[f'{task}_left_out']} left out")
    if notes:
        lines += ["", "; ".join(notes) + " (a split holds no sample of one of the classes; each problem's reason "
                  "is in `interp/probing_features.json`)."]
    return [*lines, ""]


def interp_section(probing: dict[str, Any] | None, autointerp: dict[str, Any] | None,
                   explanations: dict[int, dict[str, Any]]) -> list[str]:
    """Sparse-probing accuracies and the scored explanations from `saepipe interp`; a pointer when it has not run."""
    lines = ["## Interpretability scores", ""]
    if probing is None and not explanations and not (autointerp or {}).get("baseline_features"):
        return [*lines, "`saepipe interp` has not run for this SAE: it adds sparse probing on the corpus's labels "
                "and scored feature explanations here.", ""]
    if probing is not None and "skipped" not in probing:
        lines += probing_table(probing)
    elif probing is not None:
        lines += [f"Sparse probing skipped: {probing['skipped']}.", ""]
    auto = autointerp or {}
    if auto.get("baseline_features"):
        lines += [f"Token baseline: each of {auto['baseline_features']:,} features explained by its top tokens "
                  f"(with their share of its firings), judged by the `{TOKEN_JUDGE}` judge (Yes when the excerpt, or "
                  f"its marked part, holds one of those tokens) on held-out windows: mean detection "
                  f"{_score(auto.get('baseline_detection'))}, fuzzing {_score(auto.get('baseline_fuzzing'))} "
                  "(balanced accuracy; 0.5 is chance). It needs no model; a written explanation has to beat it.", ""]
    if explanations:
        verdict = ("beat" if auto.get("beats_baseline") else "do not beat")
        lines += [f"LLM explanations of {len(explanations)} sampled features, written and judged by "
                  f"`{auto.get('explainer')}`: mean detection {_score(auto.get('detection'))}, fuzzing "
                  f"{_score(auto.get('fuzzing'))}; on the same windows the token baseline scores "
                  f"{_score(auto.get('paired_baseline_detection'))} / {_score(auto.get('paired_baseline_fuzzing'))}: "
                  f"the LLM's explanations **{verdict}** it.", "",
                  "| feature | explanation | detection | fuzzing | token baseline (detection / fuzzing) |",
                  "|---|---|---|---|---|"]
        for f, record in sorted(explanations.items()):
            lines.append(f"| [#{f}]({BROWSER}#feature={f}) | {escape(record.get('explanation') or '')} | "
                         f"{_score(record.get('detection'))} | {_score(record.get('fuzzing'))} | "
                         f"{_score(record.get('baseline_detection'))} / {_score(record.get('baseline_fuzzing'))} |")
        lines.append("")
    return lines
