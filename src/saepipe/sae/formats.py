"""The two on-disk formats of an exported SAE; this module is their only writer and reader.

An export directory (`models/sae/<run_name>/`) holds the same SAE twice, so that both our own tools
(the predecessor's layout) and SAELens (v6, `SAE.load_from_disk`) load it without conversion:

    weights.pt               saepipe: a plain dict of float32 tensors from `export_tensors()`
                             (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                             plus `threshold` [d_sae] for architectures that have one); torch.save of
                             tensors only, so torch.load(weights_only=True) reads it
    config.json              saepipe: format, format_version, the SAEConfig fields flat (sae_type, d_in,
                             d_sae, k, ...), model_name, hook_layer, hook_name (inside the block),
                             hook_spec ("blocks.L.<hook_name>"), prepend_bos, context_size, dtype,
                             normalization {folded: true, activation_scale, normalize_activations},
                             run_name, checkpoint {name, epoch, step, tokens_seen}, training (TrainConfig),
                             data, code (the run's versions) and exported_with (saepipe at export time)
    history.json             per-epoch metrics up to the exported checkpoint
    cfg.json                 SAELens: architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input=true,
                             normalize_activations="none", reshape_activations="none", k and
                             rescale_acts_by_decoder_norm=false for "topk", and metadata (model_name,
                             hook_name as "blocks.L.<name>", hook_head_index, prepend_bos, context_size,
                             dataset_path, sae_lens_version, training_architecture, saepipe_sae_config)
    sae_weights.safetensors  SAELens: W_enc, W_dec, b_enc, b_dec (+ threshold for "jumprelu")

Both formats take RAW activations: a run trained on `activation_scale * x` has that scale folded into
its weights at export (`fold_input_scale_`), so no consumer ever needs to know it was normalised.
SAELens has no BatchTopK or Matryoshka inference SAE: like SAELens itself, they are exported as a
JumpReLU with their running threshold repeated for every latent, which encodes a token exactly as our
module does at inference (threshold >= 0, so ReLU then the mask equals the mask alone).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import saepipe
from saepipe.errors import UserError
from saepipe.sae import REGISTRY, SAEConfig, SparseAutoencoder, build_sae
from saepipe.storage import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    from saepipe.training.checkpoints import Checkpoint

FORMAT = "saepipe.sae"
FORMAT_VERSION = 1
WEIGHTS = "weights.pt"
CONFIG = "config.json"
HISTORY = "history.json"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""cfg.json follows SAELens >= 6.0 (older configs are rewritten on load; ours must not be)."""

# our architecture -> SAELens inference architecture
SAELENS_ARCH = {
    "standard": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batch_topk": "jumprelu",
    "matryoshka": "jumprelu",
}
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ---- export ------------------------------------------------------------------------------------------
def export_sae(checkpoint: Checkpoint, out_dir: str | Path) -> None:
    """Write `checkpoint` to `out_dir` in both formats, atomically (an interrupted export leaves nothing)."""
    run = checkpoint.state.get("run")
    if not isinstance(run, dict):
        raise UserError(f"{checkpoint.path}: state.json has no run info; retrain with this saepipe version")
    scale = float(run.get("activation_scale", 1.0))
    if not math.isfinite(scale) or scale <= 0:
        raise UserError(f"{checkpoint.path}: activation_scale={scale!r} is not a positive number")
    sae = copy.deepcopy(checkpoint.sae).cpu().float().eval()
    sae.fold_input_scale_(scale)
    tensors = {name: t.detach().float().contiguous() for name, t in sae.export_tensors().items()}
    config = _our_config(sae.cfg, checkpoint, run, scale)
    saelens_cfg, saelens_tensors = _saelens_export(sae.cfg, config, tensors)
    with atomic_dir(out_dir) as tmp:
        torch.save(tensors, tmp / WEIGHTS)
        write_json(tmp / CONFIG, config)
        write_json(tmp / HISTORY, checkpoint.history)
        save_file(saelens_tensors, tmp / SAELENS_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / SAELENS_CFG, saelens_cfg)
        for file in tmp.iterdir():
            file.chmod(0o644)



def _full_hook(run: dict[str, Any]) -> str | None:
    if run.get("hook_layer") is not None and run.get("hook_name"):
        return f"blocks.{int(run['hook_layer'])}.{run['hook_name']}"
    return run.get("hook_spec")


def _our_config(cfg: SAEConfig, checkpoint: Checkpoint, run: dict[str, Any], scale: float) -> dict[str, Any]:
    state = checkpoint.state
    train_config = run.get("train_config") or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **cfg.to_dict(),
        "model_name": run.get("model_name"),
        "hook_layer": run.get("hook_layer"),
        "hook_name": run.get("hook_name"),
        "hook_spec": _full_hook(run),
        "prepend_bos": run.get("prepend_bos"),
        "context_size": run.get("context_size"),
        "dtype": "float32",
        "normalization": {
            "folded": True,
            "activation_scale": scale,
            "normalize_activations": bool(run.get("normalize_activations", scale != 1.0)),
        },
        "run_name": run.get("run_name") or train_config.get("run_name") or Path(checkpoint.path).parent.name,
        "checkpoint": {
            "name": Path(checkpoint.path).name,
            "epoch": state.get("epoch"),
            "step": state.get("step"),
            "tokens_seen": state.get("tokens_seen"),
        },
        "training": train_config,
        "data": run.get("data") or {},
        "code": run.get("code") or {},
        "exported_with": {"saepipe": saepipe.__version__, "torch": torch.__version__},
    }


def _saelens_export(cfg: SAEConfig, config: dict[str, Any], tensors: dict[str, Tensor]
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """cfg.json and the weights as SAELens v6 loads them (see `sae_lens/saes/sae.py`, `load_from_disk`)."""
    arch = SAELENS_ARCH.get(cfg.sae_type)
    if arch is None:
        arch = "jumprelu" if "threshold" in tensors else None
    if arch is None:
        raise ValueError(f"no SAELens architecture for sae_type {cfg.sae_type!r}: add it to SAELENS_ARCH")
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if arch == "jumprelu" else (
        "W_enc", "W_dec", "b_enc", "b_dec")
    if arch == "jumprelu" and "threshold" not in tensors:
        raise ValueError(f"{cfg.sae_type} maps to SAELens jumprelu but exports no threshold")
    weights = {name: tensors[name] for name in names}
    data = config["data"]
    extra: dict[str, Any] = {"k": cfg.k, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}
    saelens_cfg = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": config["model_name"],
            "model_class_name": "HookedTransformer",
            "hook_name": config["hook_spec"],
            "hook_head_index": None,
            "prepend_bos": config["prepend_bos"],
            "context_size": config["context_size"],
            "exclude_special_tokens": True,  # the activation cache never holds BOS rows
            "dataset_path": data.get("activation_cache"),
            "neuronpedia_id": None,
            "model_from_pretrained_kwargs": {},
            "training_architecture": cfg.sae_type,
            "trained_with": f"saepipe {config['code'].get('saepipe', saepipe.__version__)}",
            "saepipe_sae_config": cfg.to_dict(),
            "activation_scale_folded": config["normalization"]["activation_scale"],
        },
    }
    return saelens_cfg, weights


# ---- load ----------------------------------------------------------------------------------------------
def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An exported SAE in eval mode, from either layout (ours preferred when both are present).

    `encode(x)` takes raw activations [batch, d_in]; the module carries `model_name`, `hook_layer`,
    `hook_name` (inside the block), `hook_spec` ("blocks.L.name"), `source` and `export_info` (the config).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"SAE not found: {path} is not a directory (run `saepipe export` first)")
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        sae = _load_ours(path)
    elif (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        sae = _load_saelens(path)
    else:
        raise UserError(f"{path} is not an exported SAE: expected {WEIGHTS} + {CONFIG} "
                        f"or {SAELENS_CFG} + {SAELENS_WEIGHTS}")
    sae.source = path
    return sae.to(device).eval()


def _read_config(path: Path) -> dict[str, Any]:
    config = read_json(path, "SAE config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _sae_config(values: dict[str, Any], where: Path) -> SAEConfig:
    sae_type, d_in, d_sae = values.get("sae_type"), values.get("d_in"), values.get("d_sae")
    if sae_type not in REGISTRY:
        raise UserError(f"{where}: sae_type={sae_type!r} is not one of {', '.join(sorted(REGISTRY))}")
    if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
        raise UserError(f"{where}: d_in={d_in!r}, d_sae={d_sae!r}: expected positive integers")
    try:
        return SAEConfig.from_dict(values)
    except TypeError as exc:
        raise UserError(f"{where}: invalid SAE config ({exc})") from None


def _build(cfg: SAEConfig, tensors: dict[str, Any], where: Path) -> SparseAutoencoder:
    """Build the module and load `tensors` after checking names and shapes against what it exports."""
    sae = build_sae(cfg)
    expected = {name: tuple(t.shape) for name, t in sae.export_tensors().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(got) != len(tensors):
        raise UserError(f"{where}: holds something other than tensors")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise UserError(f"{where}: tensors do not match a {cfg.sae_type} SAE "
                        f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})")
    for name, shape in expected.items():
        if got[name] != shape:
            raise UserError(f"{where}: {name} has shape {list(got[name])}, expected {list(shape)} "
                            f"(d_in={cfg.d_in}, d_sae={cfg.d_sae})")
    sae.load_export_tensors({name: t.float() for name, t in tensors.items()})
    return sae


def _attach(sae: SparseAutoencoder, info: dict[str, Any], model_name: Any, hook_spec: Any) -> None:
    match = HOOK_RE.match(hook_spec) if isinstance(hook_spec, str) else None
    sae.model_name = model_name
    sae.hook_spec = hook_spec
    sae.hook_layer = int(match.group(1)) if match else None
    sae.hook_name = match.group(2) if match else None
    sae.export_info = info


def _load_ours(path: Path) -> SparseAutoencoder:
    config = _read_config(path / CONFIG)
    cfg = _sae_config(config, path / CONFIG)
    try:
        tensors = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated zips, I/O: all mean a bad file
        raise UserError(f"{path / WEIGHTS}: not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(tensors, dict):
        raise UserError(f"{path / WEIGHTS}: expected a dict of tensors, got {type(tensors).__name__}")
    sae = _build(cfg, tensors, path / WEIGHTS)
    hook_spec = config.get("hook_spec")
    if config.get("hook_layer") is not None and config.get("hook_name"):
        hook_spec = f"blocks.{config['hook_layer']}.{config['hook_name']}"
    _attach(sae, config, config.get("model_name"), hook_spec)
    return sae


def _load_saelens(path: Path) -> SparseAutoencoder:
    """A SAELens v6 directory: ours, or any standard/topk/jumprelu SAE that fits our modules."""
    cfg_path = path / SAELENS_CFG
    config = _read_config(cfg_path)
    metadata = config.get("metadata") or {}
    try:
        tensors = load_file(path / SAELENS_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path / SAELENS_WEIGHTS}: not a readable safetensors file ({exc})") from None
    for field, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if config.get(field, allowed) != allowed:
            raise UserError(f"{cfg_path}: {field}={config[field]!r} is not supported (only {allowed!r})")
    if config.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    arch = config.get("architecture", "standard")
    ours = metadata.get("saepipe_sae_config")
    if isinstance(ours, dict) and SAELENS_ARCH.get(ours.get("sae_type")) == arch:
        values = {**ours, "d_in": config.get("d_in"), "d_sae": config.get("d_sae")}
    else:
        values = {"sae_type": _our_arch(arch, tensors, cfg_path), "d_in": config.get("d_in"),
                  "d_sae": config.get("d_sae")}
        if arch == "topk":
            values["k"] = config.get("k", 100)
    cfg = _sae_config(values, cfg_path)
    if cfg.sae_type in ("batch_topk", "matryoshka") and "threshold" in tensors:
        threshold = tensors["threshold"]
        if threshold.numel() and not torch.all(threshold == threshold.reshape(-1)[0]):
            raise UserError(f"{cfg_path}: a {cfg.sae_type} SAE needs one threshold shared by all latents")
    sae = _build(cfg, tensors, path / SAELENS_WEIGHTS)
    if not config.get("apply_b_dec_to_input", True):
        # our encoder always subtracts b_dec; adding b_dec @ W_enc to b_enc leaves pre-activations unchanged
        with torch.no_grad():
            sae.b_enc += sae.b_dec @ sae.W_enc
    _attach(sae, config, metadata.get("model_name"), metadata.get("hook_name"))
    return sae


def _our_arch(arch: str, tensors: dict[str, Tensor], where: Path) -> str:
    """The registered architecture that computes what SAELens's `arch` computes."""
    candidates = {"standard": ["standard"], "topk": ["topk"], "jumprelu": ["jumprelu", "batch_topk"]}.get(arch, [])
    for name in candidates:
        if name not in REGISTRY:
            continue
        if name == "batch_topk":
            threshold = tensors.get("threshold")
            if threshold is None or not torch.all(threshold == threshold.reshape(-1)[0]):
                continue
        return name
    raise UserError(f"{where}: SAELens architecture {arch!r} is not supported by this saepipe "
                    f"(available: {', '.join(sorted(REGISTRY))})")


# ---- compatibility ---------------------------------------------------------------------------------------
def check_compatible(sae: SparseAutoencoder, *, d_model: int | None = None, hook_spec: str | None = None,
                     model_name: str | None = None) -> None:
    """Refuse, in one line, an SAE that was not trained on this model's hook (it would run but mean nothing)."""
    where = getattr(sae, "source", None) or "(in memory)"
    if d_model is not None and sae.d_in != d_model:
        raise UserError(f"SAE at {where} takes {sae.d_in}-dimensional activations, "
                        f"but the model's d_model is {d_model}")
    theirs = getattr(sae, "hook_spec", None)
    if hook_spec is not None and theirs != hook_spec:
        trained = f"was trained on {theirs}" if theirs else "does not record its hook"
        raise UserError(f"SAE at {where} {trained}, not {hook_spec}")
    theirs = getattr(sae, "model_name", None)
    if model_name is not None and theirs != model_name:
        trained = f"was trained on model {theirs}" if theirs else "does not record its model"
        raise UserError(f"SAE at {where} {trained}, not {model_name}")
