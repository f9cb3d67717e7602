"""Atomic writes and checked reads shared by every stage.

Every artifact is written under a temporary name beside its final path and renamed only when
complete, so an interrupted stage never leaves a half-written file that looks finished. Temporary names
are `.<final name>.<pid>.<random>.tmp` (dot-prefixed, so `.dvcignore` and `.gitignore` leave them out);
one left by a process that was killed (SIGKILL skips every cleanup) is removed the next time the same
artifact is written. A full disk while writing becomes one line naming the artifact (exit code 2), and the
previous complete artifact stays as it was.

Every file one stage writes for another is read through one reader per format here (`read_json`,
`iter_jsonl`, `read_npz`, `open_npy`, `open_h5`, `load_safetensors`, `load_tensors`): a missing, truncated,
zeroed or foreign file becomes one line naming it and the `saepipe` command that writes it (exit code 2).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from saepipe.errors import UserError

LOW_SPACE_BYTES = 1 << 20
"""Below this much free space, a failed write is taken as a full disk (torch.save reports one only as a
short write: "unexpected pos")."""


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Whether `exc`, raised while writing under `where`, means its filesystem is full (or over quota).

    h5py and `open` raise OSError(ENOSPC); safetensors wraps it in its own error with "os error 28" in the
    text; torch.save raises a RuntimeError about the position: then only the free space tells.
    """
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28", "errno = 28")):
        return True
    if isinstance(exc, OSError | RuntimeError):
        try:
            return shutil.disk_usage(where).free < LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def no_space_error(final: Path) -> UserError:
    return UserError(f"{final}: no space left on device while writing it; nothing was replaced (the previous "
                     f"{final.name}, if any, is untouched); free some space and rerun")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path) -> None:
    """Remove temporaries of `final` whose writing process no longer exists (killed before it could clean up)."""
    for path in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = path.name[len(final.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except Exception as exc:
        if is_disk_full(exc, final.parent):
            raise no_space_error(final) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; it replaces `final` only on success. The files named
    in `keep` (e.g. the .gitignore DVC writes beside outputs declared one by one) move into the new folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for name in keep:
            if (final / name).is_file() and not (tmp / name).exists():
                shutil.copy2(final / name, tmp / name)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except Exception as exc:
        if is_disk_full(exc, final.parent):
            raise no_space_error(final) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _GuardedFile(io.FileIO):
    """The file under an HDF5 file being written. A write that fails (a full disk) is recorded and it and every
    later write reported as done: HDF5 must never see a failed write, after which it can neither close the file
    nor exit cleanly (the process crashes at exit). `atomic_h5` raises the recorded error instead."""

    failed: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.failed is None and done < len(view):
            try:
                done += super().write(view[done:]) or 0
            except OSError as exc:
                self.failed = exc
        return len(view)


def check_writes(file: Any) -> None:
    """Raise the error of a failed write to an HDF5 file from `atomic_h5` (writers call it as they go, so that
    a full disk stops a long stage at once rather than at its end)."""
    guard = getattr(file, "saepipe_guard", None)
    if guard is not None and guard.failed is not None:
        raise guard.failed


@contextlib.contextmanager
def atomic_h5(final: str | os.PathLike[str]) -> Iterator[Any]:
    """An h5py.File written under a temporary name and renamed when complete; a full disk is one line."""
    import h5py

    with atomic_path(final) as tmp, _GuardedFile(tmp, "w+b") as raw:
        with h5py.File(raw, "w") as file:
            file.saepipe_guard = raw
            yield file
        check_writes(file)


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


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Any]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")


def _run_first(stage: str | None) -> str:
    return f"; run `saepipe {stage}` first" if stage else ""


def _rerun(stage: str | None) -> str:
    return f"; rerun `saepipe {stage}`" if stage else ""


def read_json(path: str | os.PathLike[str], what: str, stage: str | None = None, kind: type | None = None,
              keys: tuple[str, ...] = ()) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line UserError; `stage` (the command
    that writes it) is named in the line, `kind` (dict or list) is the top-level shape expected and `keys`
    those its reader cannot do without (of the object, or of each object in the list)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}{_run_first(stage)}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: {path} is not valid JSON ({exc}){_rerun(stage)}") from None
    except OSError as exc:
        raise UserError(f"{what}: {path} cannot be read ({exc.strerror}){_rerun(stage)}") from None
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{what}: {path} holds a JSON {type(value).__name__}, expected a JSON "
                        f"{'object' if kind is dict else kind.__name__}{_rerun(stage)}")
    for i, item in enumerate(value if kind is list else [value]) if keys else ():
        where = f"item {i}" if kind is list else "it"
        if not isinstance(item, dict):
            raise UserError(f"{what}: {path}: {where} is a JSON {type(item).__name__}, expected an object"
                            f"{_rerun(stage)}")
        missing = [k for k in keys if k not in item]
        if missing:
            raise UserError(f"{what}: {path}: {where} has no key {missing[0]!r}{_rerun(stage)}")
    return value


def json_line(path: Path, number: int, line: bytes | str, stage: str | None = None) -> dict[str, Any]:
    """Line `number` of the JSON-lines file `path` as an object, or a one-line UserError naming the line."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}:{number}: not a JSON object ({exc}){_rerun(stage)}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{number}: holds a JSON {type(record).__name__}, expected an object{_rerun(stage)}")
    return record


def iter_jsonl(path: str | os.PathLike[str], stage: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a missing file or a damaged line is
    one line naming it (lines are read as bytes, so a file cut inside a character fails on its own line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{_run_first(stage)}")
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, json_line(path, number, line, stage)


def read_npz(path: str | os.PathLike[str], keys: tuple[str, ...], stage: str | None = None) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz file, read whole; a missing, damaged or incomplete file is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{_run_first(stage)}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UserError(f"{path}: holds no array {missing[0]!r} (it has {', '.join(data.files) or 'none'})"
                                f"{_rerun(stage)}")
            return {k: data[k] for k in keys}
    except UserError:
        raise
    except Exception as exc:  # zipfile, zlib, numpy's header parser and EOF each raise their own
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: {_first_line(exc)})"
                        f"{_rerun(stage)}") from None


def open_npy(path: str | os.PathLike[str], stage: str | None = None) -> np.ndarray:
    """An .npy file memory-mapped read-only (its header and length checked); a damaged file is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{_run_first(stage)}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npy file ({type(exc).__name__}: {_first_line(exc)})"
                        f"{_rerun(stage)}") from None


def open_h5(path: str | os.PathLike[str], what: str, stage: str) -> Any:
    """An HDF5 file open for reading; a missing or unreadable one is one line naming it and `stage`."""
    import h5py

    path = require_file(path, what, f"run `saepipe {stage}` first")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({_first_line(exc)}){_rerun(stage)}") from None


def load_safetensors(path: str | os.PathLike[str], stage: str, device: str = "cpu") -> dict[str, Any]:
    """Every tensor of a safetensors file; a missing or damaged one is one line naming it and `stage`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(exc)}){_rerun(stage)}") from None


def load_tensors(path: str | os.PathLike[str], what: str, stage: str, map_location: Any = "cpu") -> Any:
    """A torch.save file of tensors only (weights_only); a missing or damaged one is one line naming it."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated zips, I/O: all mean a bad file
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}){_rerun(stage)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


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
