"""`saepipe show-feature N` / `--search TEXT`: one feature, or the features of a token, in the terminal.

Not a DVC stage: it reads the activation DB, the token cache and the tokenizer (and, when they exist, the
matrices and summaries of the same SAE), and writes nothing. Every refusal comes before the tokenizer is
loaded, and nothing here imports torch or transformers: a query answers in about a second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from saepipe.activations.run_name import with_run_name
from saepipe.config import Params
from saepipe.config.analysis import SummarizeConfig
from saepipe.errors import UserError
from saepipe.paths import (
    COOCCURRENCE_TOPK,
    MATRICES_METADATA,
    SAELENS_WEIGHTS,
    SIMILARITY_TOPK,
    activation_db,
    evaluated_sae,
    matrices_dir,
    summaries_file,
)

DESCRIBE_TOKENS = 3
"""Top tokens in each feature's one-line description in --search."""
UNUSED_FIELDS = ("index_tokens",)
"""summarize's knob of summary_index.json: it means nothing for a single feature (cli leaves its flag out)."""
FIELD_NOTES = {
    "top_tokens": " (show-feature: with each one's share of the feature's firings)",
    "neighbours": " (show-feature: from the matrices stage, else the nearest by the export's decoder rows; "
                  "0: none)",
    "logit_tokens": " (show-feature: read from feature_summaries.jsonl, since computing them needs the model; "
                    "run `saepipe summarize` first)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("feature", nargs="?", type=int, help="the feature id to show")
    parser.add_argument("--search", metavar="TEXT",
                        help="list the features most active on a token instead, e.g. photosynthesis "
                        "(matched with and without a leading space, and in any case: see --case-sensitive)")
    parser.add_argument("--case-sensitive", action="store_true",
                        help="--search only the spelling given (by default its lower-case, upper-case and "
                        "capitalised spellings count as one token)")
    parser.add_argument("--results", type=int, default=10, metavar="N", help="features listed by --search")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="shade activating tokens (auto: when stdout is a terminal)")


def check_args(args: argparse.Namespace) -> None:
    """Every refusal the arguments alone decide, before any file is opened."""
    if (args.feature is None) == (args.search is None):
        raise UserError("give a feature id or --search TEXT (one of them)")
    if args.search is not None and not args.search.strip():
        raise UserError(f"--search={args.search!r}: expected a token's text (not empty or blank)")
    if args.results < 1:
        raise UserError(f"--results={args.results}: expected an integer >= 1")
    if args.feature is not None and args.feature < 0:
        raise UserError(f"feature={args.feature}: expected an id >= 0")


def run(params: Params, args: argparse.Namespace) -> None:
    check_args(args)  # before a null run name is derived from the activation cache
    show(with_run_name(params), args)


def show(params: Params, args: argparse.Namespace) -> None:
    from saepipe.analysis.activation_db import ActivationDB
    from saepipe.model.tokenizer import load_reading_tokenizer

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    with ActivationDB(activation_db(params), tokens=params.tokenize.output) as db:
        stats = db.feature_stats(args.feature) if args.feature is not None else None  # refuses an id >= d_sae
        db.check_sae(evaluated_sae(params))
        db.tokenizer = load_reading_tokenizer(params.base_model.output_dir)
        if stats is None:
            print(search_view(db, args.search, args.results, args.case_sensitive, params.summarize))
        else:
            print(feature_view(params, db, stats, color))


def search_view(db: Any, text: str, k: int, case_sensitive: bool, cfg: SummarizeConfig) -> str:
    from saepipe.analysis.summaries import top_tokens
    from saepipe.report.terminal import render_search

    results = db.search_tokens(text, k, case_sensitive=case_sensitive)
    described = {r.feature: top_tokens(db, db.feature_rows(r.feature)[0], min(cfg.top_tokens, DESCRIBE_TOKENS))
                 for r in results}
    counts = {r.feature: int(db.counts[r.feature]) for r in results}
    return render_search(text, results, described, counts, case_sensitive)


def feature_view(params: Params, db: Any, stats: dict[str, Any], color: bool) -> str:
    from saepipe.analysis.summaries import top_tokens
    from saepipe.report import terminal

    cfg, f = params.summarize, stats["feature"]
    context = (cfg.context_before, cfg.context_after)
    top = db.top_examples(f, cfg.top_k, context)
    bands = {q: db.quantile_examples(f, q, cfg.quantile_examples, context) for q in cfg.quantile_bands}
    lines = [terminal.render_feature(stats, top, bands, color)]
    if stats["alive"]:
        lines.append(terminal.render_top_tokens(top_tokens(db, db.feature_rows(f)[0], cfg.top_tokens), stats["count"]))
    if cfg.neighbours:
        lines.append(terminal.render_neighbours(*neighbours(params, db, f, cfg.neighbours)))
    lines.append(terminal.render_logit_lens(*logit_lens(params, stats, cfg.logit_tokens)))
    return "\n".join(lines)


# ---- what other stages computed for the same SAE --------------------------------------------------------------
def _matrices_row(params: Params, db: Any, name: str, keys: tuple[str, ...], f: int) -> tuple[Any, ...] | None:
    """Feature f's row of each of `keys` in a matrices-stage top-k file; None when the file is missing, of
    another SAE than the DB (its metadata's weights hash), or of another size."""
    from saepipe.storage import read_npz

    folder = matrices_dir(params)
    try:
        meta = json.loads((folder / MATRICES_METADATA).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("sae_sha256") != db.attrs["sae_sha256"]:
            return None
        arrays = list(read_npz(folder / name, keys).values())
    except (OSError, ValueError, UserError):
        return None
    if any(a.shape[0] != db.d_sae for a in arrays):
        return None
    return tuple(a[f] for a in arrays)


def decoder_neighbours(sae_path: Path, f: int, n: int, d_sae: int) -> list[tuple[int, float]] | None:
    """f's `n` nearest other features by cosine of the export's decoder rows (read with safetensors' numpy
    reader, no torch); None when the export has no safetensors file of d_sae rows."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        W = load_file(str(sae_path / SAELENS_WEIGHTS))["W_dec"].astype(np.float64)
    except (OSError, KeyError, ValueError, SafetensorError):  # the caller says neighbours are unavailable
        return None
    if W.ndim != 2 or W.shape[0] != d_sae:
        return None
    norms = np.linalg.norm(W, axis=1)
    cosine = (W @ W[f]) / np.where(norms == 0, 1.0, norms) / (norms[f] or 1.0)
    cosine[f] = -np.inf
    order = np.argsort(-cosine, kind="stable")[: min(n, d_sae - 1)]
    return [(int(i), float(cosine[i])) for i in order]


def neighbours(params: Params, db: Any, f: int, n: int) -> tuple[list[tuple[int, float]] | None,
                                                                  list[tuple[int, float, int]] | None, str]:
    """(nearest by decoder cosine, co-occurring by Jaccard, where they come from): the matrices stage's
    top-k files when they are of this SAE, else the nearest computed from the export, co-occurring unknown."""
    nearest = _matrices_row(params, db, SIMILARITY_TOPK, ("ids", "values"), f)
    cooc = _matrices_row(params, db, COOCCURRENCE_TOPK, ("ids", "jaccard", "counts"), f)
    cooccurring = None if cooc is None else [(int(i), float(j), int(c)) for i, j, c in zip(*cooc, strict=True)
                                             if c > 0][:n]
    if nearest is not None:
        return [(int(i), float(v)) for i, v in zip(*nearest, strict=True)][:n], cooccurring, \
            f"from {matrices_dir(params)}"
    computed = decoder_neighbours(evaluated_sae(params), f, n, db.d_sae)
    hint = "run `saepipe matrices` for the top-k files"
    if computed is None:
        return None, cooccurring, f"no matrices of this SAE and no decoder rows to compute them from; {hint}"
    return computed, cooccurring, f"from the decoder rows of {evaluated_sae(params)}; {hint}"


def summary_line(path: Path, f: int) -> dict[str, Any] | None:
    """Feature f's line of feature_summaries.jsonl (line f), None when the file or the line is missing."""
    try:
        with open(path, encoding="utf-8") as handle:
            line = next(itertools.islice(handle, f, f + 1), None)
        summary = json.loads(line) if line else None
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def logit_lens(params: Params, stats: dict[str, Any], n: int) -> tuple[list[dict[str, Any]] | None,
                                                                       list[dict[str, Any]] | None, str]:
    """(promoted, suppressed, a note): the logit lens of feature f as the summarize stage wrote it (computing
    it needs the model), or (None, None, how to get it) when there is no summary of this feature of this DB."""
    path, f = summaries_file(params), stats["feature"]
    if not path.is_file():
        return None, None, f"not computed yet (it needs the model): run `saepipe summarize`, which writes {path}"
    summary = summary_line(path, f)
    if summary is None or summary.get("id") != f or summary.get("count") != stats["count"] \
            or "promoted_tokens" not in summary:
        return None, None, f"{path} does not hold this feature of the activation DB; rerun `saepipe summarize`"
    promoted, suppressed = summary["promoted_tokens"], summary.get("suppressed_tokens", [])
    kept = len(promoted)
    note = f"from {path}" + (f" (which keeps {kept} per feature; rerun `saepipe summarize --logit-tokens {n}` "
                             "for more)" if kept < n else "")
    return promoted[:n], suppressed[:n], note
