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
