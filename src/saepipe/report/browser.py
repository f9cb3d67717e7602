"""The static feature browser: `index.html` plus data files that open from disk (file://), no server, no network.

Browsers refuse `fetch()` of local files, so every data file is a script that hands its JSON to the page:
`SAEBrowser.receive(name, data)`. The page loads `data/index.js` (every feature's id, stats, top tokens: what
the list needs) at once, and each feature's details (`data/features-NNNN.js`, `chunk_size` features each)
and the token-search table (`data/tokens.js`) only when they are first needed, so thousands of features
open in a fraction of a second.

    out_dir/
        index.html              the page (title filled in; everything else is built by assets/browser.js)
        assets/browser.js, browser.css
        data/index.js           run info and columnar per-feature fields: id, alive, count, density, mean,
                                max, top (token strings), chunk, and explanation where one was given; and
                                where the corpus has labels, documents: {names: each distinct subject and
                                chapter, of: per document id, its index into names (-1: unlabelled)}
        data/features-NNNN.js   the summaries' records of features [NNNN * chunk_size, ...) in file order,
                                with `explanation` / `detection` / `fuzzing` merged in where given
        data/tokens.js          per token id of the corpus: its piece, occurrences and strongest features

A feature page also offers the feature's matches in other runs: `../../matches/index.js` (from the browser in
`<analysis>/<run>/report/browser/`: `<analysis>/<run>/matches/`), which `saepipe compare --features RUN OTHER`
writes after the report; it is loaded on request, as it may not exist.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from saepipe.analysis.activation_db import SEARCH_OCCURRENCES, ActivationDB
from saepipe.errors import UserError
from saepipe.storage import atomic_dir, iter_jsonl

CHUNK_SIZE = 128
"""Features per detail file: about 1.7 MB of script for the default run's 20 top examples a feature."""
LIST_PAGE = 200
"""Rows the list shows at first and adds with each "Show more" (the DOM stays small for any d_sae)."""
INDEX_TOKENS = 5
"""Top tokens per feature in the list (and the text filter's haystack)."""
ASSETS = ("browser.js", "browser.css")
EXPLANATION_FIELDS = ("explanation", "detection", "fuzzing")


def _finite(value: Any) -> Any:
    """JSON-safe values: NaN and infinities (a dead feature's mean, say) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _script(name: str, data: Any) -> str:
    """A data file: one call that hands `data` to the page (JSON is valid JavaScript)."""
    payload = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"SAEBrowser.receive({json.dumps(name)},{payload});\n"


def read_summaries(path: Path) -> Iterator[dict[str, Any]]:
    """The summarize stage's records, one per line, checked enough to fail with the line that is wrong."""
    for number, record in iter_jsonl(path, "summarize"):
        if not isinstance(record.get("id"), int):
            raise UserError(f"{path}:{number}: expected a feature summary with an integer `id`; "
                            "rerun `saepipe summarize`")
        yield record


def token_table(db: ActivationDB, features_per_token: int) -> dict[str, Any]:
    """Every corpus token's strongest features, most frequent tokens first: [piece, id, occurrences,
    features, mean activations, fire fractions] (what `db.search_tokens` gives for that token alone)."""
    if db.tokenizer is None:
        raise UserError("the feature browser's token search needs the tokenizer: ActivationDB(path, tokenizer=...)")
    table = db.token_feature_table(features_per_token)
    entries = []
    for i, token in enumerate(table.token_ids.tolist()):
        found = table.features[i] >= 0
        if not found.any():
            continue
        entries.append([db.piece(token), token, int(table.occurrences[i]), table.features[i][found].tolist(),
                        [round(float(v), 4) for v in table.mean_activation[i][found]],
                        [round(float(v), 4) for v in table.fire_fraction[i][found]]])
    entries.sort(key=lambda e: (-e[2], e[1]))
    return {"features_per_token": features_per_token, "max_occurrences": SEARCH_OCCURRENCES, "tokens": entries}


def _index_columns(records: list[dict[str, Any]], chunk: int, columns: dict[str, list[Any]]) -> None:
    for r in records:
        columns["id"].append(r["id"])
        columns["alive"].append(1 if r.get("alive") else 0)
        columns["count"].append(r.get("count", 0))
        columns["density"].append(r.get("density", 0.0))
        columns["mean"].append(r.get("mean"))
        columns["max"].append(r.get("max", 0.0))
        columns["top"].append([t["token"] for t in r.get("top_tokens", [])[:INDEX_TOKENS]])
        columns["chunk"].append(chunk)
        columns["explanation"].append(r.get("explanation"))


def document_table(names: Sequence[str | None]) -> dict[str, list[Any]] | None:
    """Each document's name (subject and chapter) for the examples, each distinct name written once: the
    examples name their document by id, and thousands of them share a few chapters. None: no names."""
    distinct = sorted({name for name in names if name})
    if not distinct:
        return None
    where = {name: i for i, name in enumerate(distinct)}
    return {"names": distinct, "of": [where[name] if name else -1 for name in names]}


def write_browser(out_dir: Path, *, summaries: Path, db: ActivationDB, run_info: dict[str, Any],
                  features_per_token: int, explanations: dict[int, dict[str, Any]] | None = None,
                  documents: Sequence[str | None] = (), chunk_size: int = CHUNK_SIZE,
                  list_page: int = LIST_PAGE) -> dict[str, Any]:
    """Write the browser to `out_dir` (replaced as a whole, only once complete) from the summaries, the
    activation DB's token search and `run_info` (shown in the header); `explanations` maps a feature id
    to {explanation, detection, fuzzing} (auto-interpretation), merged into its record where given;
    `documents` names each document by id (report.inputs.document_names), shown beside its examples.
    Returns {"features", "files", "bytes"}."""
    if features_per_token < 1:
        raise UserError(f"features_per_token={features_per_token!r}: expected an integer >= 1")
    for name, value in (("chunk_size", chunk_size), ("list_page", list_page)):
        if value < 1:
            raise UserError(f"{name}={value!r}: expected an integer >= 1")
    explanations = explanations or {}
    columns: dict[str, list[Any]] = {k: [] for k in
                                     ("id", "alive", "count", "density", "mean", "max", "top", "chunk", "explanation")}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        data = tmp / "data"
        data.mkdir()
        chunks: list[str] = []
        seen: set[int] = set()

        def flush(records: list[dict[str, Any]]) -> None:
            name = f"features-{len(chunks):04d}"
            (data / f"{name}.js").write_text(_script(name, records), encoding="utf-8")
            _index_columns(records, len(chunks), columns)
            chunks.append(f"data/{name}.js")

        batch: list[dict[str, Any]] = []
        for record in read_summaries(Path(summaries)):
            if record["id"] in seen:
                raise UserError(f"{summaries}: feature {record['id']} appears twice; rerun `saepipe summarize`")
            seen.add(record["id"])
            extra = explanations.get(record["id"])
            if extra:
                record.update({k: extra[k] for k in EXPLANATION_FIELDS if extra.get(k) is not None})
            batch.append(record)
            if len(batch) == chunk_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if not seen:
            raise UserError(f"{summaries}: no feature summaries; rerun `saepipe summarize`")
        if not any(e is not None for e in columns["explanation"]):
            del columns["explanation"]
        index = {"run": run_info, "chunk_size": chunk_size, "list_page": list_page, "chunks": chunks,
                 "features": columns, "quantile_levels": db.quantile_levels, "tokens": "data/tokens.js"}
        table = document_table(documents)
        if table:
            index["documents"] = table
        (data / "index.js").write_text(_script("index", index), encoding="utf-8")
        (data / "tokens.js").write_text(_script("tokens", token_table(db, features_per_token)), encoding="utf-8")
        assets = resources.files("saepipe.report") / "browser_assets"
        (tmp / "assets").mkdir()
        for name in ASSETS:
            (tmp / "assets" / name).write_text((assets / name).read_text(encoding="utf-8"), encoding="utf-8")
        title = f"Feature browser: {run_info.get('run_name', 'SAE')}"
        page = (assets / "index.html").read_text(encoding="utf-8").replace("{{title}}", html.escape(title))
        (tmp / "index.html").write_text(page, encoding="utf-8")
        files = [p for p in tmp.rglob("*") if p.is_file()]
        result = {"features": len(seen), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return result
