"""Document labels (`labels.json` beside `texts.json`): each document's subject and chapter.

Layout: a UTF-8 JSON array aligned with the document list, one object per document,
`{"subject": "physics", "chapter": "physics_ch01_measurement-and-units"}` (the chapter is its file's
stem). Documents from `process.data_path` carry no labels: both fields are "unknown". A separate file
keeps `texts.json` the plain `list[str]` every tool can write; `interp`'s probes read the labels.
"""

from __future__ import annotations

import os

from saepipe.errors import UserError
from saepipe.storage import read_json, require_file, write_json

UNKNOWN = "unknown"
LABEL_KEYS = ("subject", "chapter")


def save_labels(path: str | os.PathLike[str], labels: list[dict[str, str]]) -> None:
    write_json(path, labels)


def load_labels(path: str | os.PathLike[str], n_documents: int) -> list[dict[str, str]]:
    """Read and check a labels file against the corpus it must describe (`n_documents` documents)."""
    path = require_file(path, "document labels", "run `saepipe process`: it writes them beside texts.json")
    labels = read_json(path, "document labels")
    if not isinstance(labels, list) or not all(
            isinstance(item, dict) and all(isinstance(item.get(k), str) for k in LABEL_KEYS) for item in labels):
        raise UserError(f"{path}: expected a JSON list of {{\"subject\": str, \"chapter\": str}}, one per document; "
                        "rerun `saepipe process`")
    if len(labels) != n_documents:
        raise UserError(f"{path} labels {len(labels)} documents but the token cache holds {n_documents}; "
                        "rerun `saepipe process` and `saepipe tokenize`")
    return [{k: item[k] for k in LABEL_KEYS} for item in labels]
