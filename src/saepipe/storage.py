"""Atomic writes and checked reads shared by every stage.

Every artifact is written under a temporary name beside its final path and renamed only when
complete, so an interrupted stage never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

from saepipe.errors import UserError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; it replaces `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain(value: Any) -> Any:
    """HDF5 attributes and numpy reductions come back as numpy scalars; JSON and callers want Python ones."""
    return value.item() if isinstance(value, np.generic) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, pretty-printed and newline-terminated (diff-friendly for DVC metrics)."""
    with atomic_path(path) as tmp:
        text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
        tmp.write_text(text + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: {path} is not valid JSON ({exc})") from None


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """Return `path` if it is a file, else a UserError that says which stage produces it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}" + (f" ({hint})" if hint else ""))
    return path


def dir_size_bytes(path: str | os.PathLike[str]) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class OpenFile:
    """Context-manager plumbing for the format readers, which hold their HDF5 file open as `self.file`."""

    file: Any

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
