"""The document list: the one format between `process` and `tokenize` (and `process.data_path`).

Layout: a UTF-8 JSON file holding a non-empty array of strings, one string per document, in
corpus order, e.g. `["1.1 Units\\nPhysics is ...", "1.2 ..."]`. Nothing else (no wrapping object,
no metadata: that goes to `stats.json`), so any tool that writes a JSON list of strings can feed the
pipeline. Reading checks the whole contract and fails with one line that names the file, because a
bad list would otherwise surface much later as a confusing tokenizer error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from saepipe.errors import UserError
from saepipe.storage import write_json

EXPECTED = "expected a JSON list of strings (one per document)"


def load_texts(path: str | os.PathLike[str]) -> list[str]:
    """Read and check a document list; every failure is a one-line UserError naming `path`."""
    path = Path(path)
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "file not found"
        raise UserError(f"{path}: {reason}; {EXPECTED}")
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {EXPECTED}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                        f"{EXPECTED}") from None
    if not isinstance(texts, list):
        raise UserError(f"{path}: holds a JSON {_json_type(texts)}; {EXPECTED}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{path}: item {index} is a JSON {_json_type(text)}; {EXPECTED}")
    if not texts:
        raise UserError(f"{path}: the list is empty; {EXPECTED}, at least one")
    return texts


def save_texts(path: str | os.PathLike[str], texts: list[str]) -> None:
    """Write a document list atomically (a crash never leaves a truncated list behind)."""
    write_json(path, texts)


def _json_type(value: object) -> str:
    """The JSON name of a decoded value, for messages a non-Python user understands."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
