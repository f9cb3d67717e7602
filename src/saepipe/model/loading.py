"""Load the local base model into TransformerLens, offline.

We use TransformerLens's TransformerBridge: it boots any Hugging Face causal LM from a local directory
(HookedTransformer.from_pretrained rejects local paths and unlisted models such as SmolLM2) and, in
compatibility mode without weight processing, exposes HookedTransformer's hook names
(`blocks.15.hook_resid_post`) on activations that equal the HF model's hidden states.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from saepipe.errors import UserError, field_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(model: Any) -> torch.device:
    """Where a loaded model's weights live (inputs must go there)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def resolve_device(device: str, field: str = "activations.device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise field_error(field, device, "cpu or auto: CUDA is not available on this machine")
    return torch.device(device)


def check_4bit(device: torch.device, field: str = "activations.load_in_4bit") -> None:
    """4-bit loading needs bitsandbytes on CUDA; anywhere else it is a user error, not a crash."""
    if device.type != "cuda":
        raise field_error(field, True, f"false on {device.type}: 4-bit loading needs a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise field_error(field, True, "false, or install bitsandbytes (pip install bitsandbytes)")


def load_hooked_model(
    model: str | Path,
    *,
    device: torch.device,
    dtype: str = "float32",
    load_in_4bit: bool = False,
) -> Any:
    """A TransformerBridge in compatibility mode (HookedTransformer hook names, raw HF numerics).

    `model` is a local HF directory (what `saepipe base-model` writes) or a model name that the
    Hugging Face cache already holds (set HF_HUB_OFFLINE=1 to stay offline).
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = str(model)
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise UserError(f"{name} is not a model directory (no config.json); run `saepipe base-model` first")
    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        check_4bit(device)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype)
        kwargs["hf_model"] = AutoModelForCausalLM.from_pretrained(
            name, quantization_config=quant, device_map={"": str(device)}, dtype=torch_dtype
        )
    else:
        kwargs["device"] = device
    with _quiet():
        try:
            bridge = TransformerBridge.boot_transformers(name, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load model {name}: {str(exc).splitlines()[0]}") from None
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    bridge.eval()
    return bridge


class _quiet:
    """Silence the bridge's informational warnings and loading bars while booting."""

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        self._hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._tl_level = logging.getLogger("transformer_lens").level
        logging.getLogger("transformer_lens").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._hf_level)
        hf_logging.enable_progress_bar()
        logging.getLogger("transformer_lens").setLevel(self._tl_level)
        self._warnings.__exit__(*exc)
