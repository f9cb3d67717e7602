"""The base model's tokenizer, and a fingerprint that lets later stages refuse a mismatch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from saepipe.errors import UserError


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"base model directory not found: {path} (run `saepipe base-model` first)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"no usable tokenizer in {path}: {str(exc).splitlines()[0]}") from None


class _RustTokenizer:
    """The slice of a transformers fast tokenizer that reading token ids needs (`decode`, and the call that
    returns input_ids), on the `tokenizers` library alone: it loads in a fraction of a second, not seconds."""

    def __init__(self, backend: Any):
        self.backend = backend

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def load_reading_tokenizer(model_dir: str | Path) -> Any:
    """A tokenizer for decoding and looking up tokens only (show-feature): tokenizer.json read by `tokenizers`
    when transformers would decode it the same way (no clean-up of spaces), else `load_tokenizer`."""
    path = Path(model_dir)
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not (path / "tokenizer.json").is_file() or not isinstance(config, dict) \
            or config.get("clean_up_tokenization_spaces"):
        return load_tokenizer(path)
    from tokenizers import Tokenizer

    try:
        return _RustTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")))
    except Exception:  # any trouble (tokenizers raises plain Exception): the full loader copes or says why
        return load_tokenizer(path)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the ids: the vocabulary and the special tokens (not the file layout)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
