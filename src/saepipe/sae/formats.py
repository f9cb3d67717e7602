"""The two on-disk formats of an exported SAE; this module is their only writer and reader.

An export directory (`models/sae/<run_name>/`) holds the same SAE twice, so that both our own tools
(the predecessor's layout) and SAELens (v6, `SAE.load_from_disk`) load it without conversion:

    weights.pt               saepipe: a plain dict of float32 tensors from `export_tensors()`
                             (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                             plus `threshold` [d_sae] for architectures that have one); torch.save of
                             tensors only, so torch.load(weights_only=True) reads it
    config.json              saepipe: format, format_version, the SAEConfig fields flat (sae_type, d_in,
                             d_sae, k, ...), model_name, hook ("blocks.L.<name>", read by
                             `model.hooks.HookSpec.parse`), prepend_bos, context_size, dtype,
                             normalization {folded: true, activation_scale, normalize_activations},
                             run_name, checkpoint {name, epoch, step, tokens_seen}, calibration
                             (BatchTopK/Matryoshka: threshold, rows, train_l0, val_l0 of the exported epoch;
                             null for the others), training (TrainConfig),
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
JumpReLU with their threshold repeated for every latent, which encodes a token exactly as our module
does at inference (threshold >= 0, so ReLU then the mask equals the mask alone). The threshold is the
calibrated one (k latents per training token on average), not a running average of batch cuts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saepipe.errors import UserError
from saepipe.model.hooks import HookSpec
from saepipe.paths import EXPORT_WEIGHTS, SAELENS_WEIGHTS
from saepipe.sae import REGISTRY, SAEConfig, SparseAutoencoder, build_sae, config_class
from saepipe.sae.batch_topk import BatchTopKConfig
from saepipe.sae.provenance import Provenance, RunRecord
from saepipe.storage import atomic_dir, load_safetensors, load_tensors, read_json, write_json
from saepipe.version import VERSION

FORMAT = "saepipe.sae"
FORMAT_VERSION = 2  # 2: the hook is one key, `hook` (1: hook_layer, hook_name, hook_spec)
WEIGHTS = EXPORT_WEIGHTS
CONFIG = "config.json"
HISTORY = "history.json"
SAELENS_CFG = "cfg.json"
SAELENS_FORMAT_VERSION = "6.0.0"
"""cfg.json follows SAELens >= 6.0 (older configs are rewritten on load; ours must not be)."""


# ---- export ------------------------------------------------------------------------------------------
def export_sae(sae: SparseAutoencoder, run: RunRecord, history: list[dict[str, Any]], out_dir: str | Path,
               checkpoint: dict[str, Any]) -> None:
    """Write a trained `sae` (in training space) to `out_dir` in both formats, atomically (an interrupted
    export leaves nothing). `checkpoint` names what is exported: name, epoch, step, tokens_seen."""
    scale = float(run.activation_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise UserError(f"{checkpoint.get('name')}: activation_scale={scale!r} is not a positive number")
    sae = copy.deepcopy(sae).cpu().float().eval()
    sae.fold_input_scale_(scale)
    tensors = {name: t.detach().float().contiguous() for name, t in sae.export_tensors().items()}
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{checkpoint.get('name')} (epoch {checkpoint.get('epoch')}): {', '.join(bad)} hold NaN or "
                        "Inf; refusing to export non-finite weights")
    config = _our_config(sae.cfg, run, checkpoint, _calibration(history, checkpoint.get("epoch")))
    saelens_cfg, saelens_tensors = _saelens_export(sae.cfg, config, tensors)
    with atomic_dir(out_dir) as tmp:
        torch.save(tensors, tmp / WEIGHTS)
        write_json(tmp / CONFIG, config)
        write_json(tmp / HISTORY, history)
        save_file(saelens_tensors, tmp / SAELENS_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / SAELENS_CFG, saelens_cfg)
        for file in tmp.iterdir():
            file.chmod(0o644)


CALIBRATION_KEYS = {"inference_threshold": "threshold", "calibration_rows": "rows", "calibration_l0": "train_l0",
                    "val_l0": "val_l0"}


def _calibration(history: list[dict[str, Any]], epoch: Any) -> dict[str, Any] | None:
    """How the exported epoch's inference threshold was fitted (BatchTopK, Matryoshka), from its history record."""
    record = next((r for r in history if r.get("epoch") == epoch), None)
    if record is None or "inference_threshold" not in record:
        return None
    out = {name: record[key] for key, name in CALIBRATION_KEYS.items() if key in record}
    out["rows"] = int(out["rows"]) if "rows" in out else None
    return out


def _our_config(cfg: SAEConfig, run: RunRecord, checkpoint: dict[str, Any], calibration: dict[str, Any] | None
                ) -> dict[str, Any]:
    record = run.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **cfg.to_dict(),
        **{key: record[key] for key in ("model_name", "hook", "prepend_bos", "context_size")},
        "dtype": "float32",
        "normalization": {
            "folded": True,
            "activation_scale": run.activation_scale,
            "normalize_activations": run.normalize_activations,
        },
        "run_name": run.run_name,
        "checkpoint": {key: checkpoint.get(key) for key in ("name", "epoch", "step", "tokens_seen")},
        "calibration": calibration,
        "training": run.train_config,
        "data": run.data,
        "code": run.code,
        "exported_with": {"saepipe": VERSION, "torch": torch.__version__},
    }


def _saelens_export(cfg: SAEConfig, config: dict[str, Any], tensors: dict[str, Tensor]
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """cfg.json and the weights as SAELens v6 loads them (see `sae_lens/saes/sae.py`, `load_from_disk`)."""
    arch = cfg.saelens_architecture
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if arch == "jumprelu" else (
        "W_enc", "W_dec", "b_enc", "b_dec")
    if arch == "jumprelu" and "threshold" not in tensors:
        raise ValueError(f"{cfg.sae_type} maps to SAELens jumprelu but exports no threshold")
    weights = {name: tensors[name] for name in names}
    data = config["data"]
    saelens_cfg = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        **cfg.saelens_fields(),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": config["model_name"],
            "model_class_name": "HookedTransformer",
            "hook_name": config["hook"],  # SAELens's key for the full name
            "hook_head_index": None,
            "prepend_bos": config["prepend_bos"],
            "context_size": config["context_size"],
            "exclude_special_tokens": True,  # the activation cache never holds BOS rows
            "dataset_path": data.get("activation_cache"),
            "neuronpedia_id": None,
            "model_from_pretrained_kwargs": {},
            "training_architecture": cfg.sae_type,
            "trained_with": f"saepipe {config['code'].get('saepipe', VERSION)}",
            "saepipe_sae_config": cfg.to_dict(),
            "activation_scale_folded": config["normalization"]["activation_scale"],
            "saepipe_calibration": config["calibration"],
        },
    }
    return saelens_cfg, weights


# ---- load ----------------------------------------------------------------------------------------------
def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An exported SAE in eval mode, from either layout (ours preferred when both are present).

    `encode(x)` takes raw activations [batch, d_in]; `sae.provenance` says where it came from (the
    folder, the model and hook it was trained on, the config as written).
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
        return config_class(sae_type).from_dict(values)
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


def _provenance(path: Path, config: dict[str, Any], model_name: Any, hook: Any) -> Provenance:
    try:
        hook = HookSpec.parse(hook) if isinstance(hook, str) else None
    except ValueError:
        hook = None
    return Provenance(source=path, model_name=model_name if isinstance(model_name, str) else None, hook=hook,
                      config=config)


def _load_ours(path: Path) -> SparseAutoencoder:
    config = _read_config(path / CONFIG)
    cfg = _sae_config(config, path / CONFIG)
    tensors = load_tensors(path / WEIGHTS, "weights file", "export")
    if not isinstance(tensors, dict):
        raise UserError(f"{path / WEIGHTS}: expected a dict of tensors, got {type(tensors).__name__}")
    sae = _build(cfg, tensors, path / WEIGHTS)
    # format_version 1 wrote the hook as hook_layer / hook_name / hook_spec
    hook = config.get("hook") if config.get("format_version", 1) >= 2 else config.get("hook_spec")
    sae.provenance = _provenance(path, config, config.get("model_name"), hook)
    return sae


def _load_saelens(path: Path) -> SparseAutoencoder:
    """A SAELens v6 directory: ours, or any standard/topk/jumprelu SAE that fits our modules."""
    cfg_path = path / SAELENS_CFG
    config = _read_config(cfg_path)
    metadata = config.get("metadata") or {}
    tensors = load_safetensors(path / SAELENS_WEIGHTS, "export")
    for field, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if config.get(field, allowed) != allowed:
            raise UserError(f"{cfg_path}: {field}={config[field]!r} is not supported (only {allowed!r})")
    if config.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    arch = config.get("architecture", "standard")
    ours = metadata.get("saepipe_sae_config")
    if (isinstance(ours, dict) and ours.get("sae_type") in REGISTRY
            and config_class(ours["sae_type"]).saelens_architecture == arch):
        values = {**ours, "d_in": config.get("d_in"), "d_sae": config.get("d_sae")}
    else:
        values = {"sae_type": _our_arch(arch, cfg_path), "d_in": config.get("d_in"),
                  "d_sae": config.get("d_sae")}
        if arch == "topk":
            values["k"] = config.get("k", 100)
    cfg = _sae_config(values, cfg_path)
    if isinstance(cfg, BatchTopKConfig) and "threshold" in tensors:
        threshold = tensors["threshold"]
        if threshold.numel() and not torch.all(threshold == threshold.reshape(-1)[0]):
            raise UserError(f"{cfg_path}: a {cfg.sae_type} SAE needs one threshold shared by all latents")
    sae = _build(cfg, tensors, path / SAELENS_WEIGHTS)
    if not config.get("apply_b_dec_to_input", True):
        # our encoder always subtracts b_dec; adding b_dec @ W_enc to b_enc leaves pre-activations unchanged
        with torch.no_grad():
            sae.b_enc += sae.b_dec @ sae.W_enc
    sae.provenance = _provenance(path, config, metadata.get("model_name"), metadata.get("hook_name"))
    return sae


def _our_arch(arch: str, where: Path) -> str:
    """The registered architecture of the same name as SAELens's `arch` (standard, topk, jumprelu)."""
    if arch in REGISTRY and config_class(arch).saelens_architecture == arch:
        return arch
    raise UserError(f"{where}: SAELens architecture {arch!r} is not supported by this saepipe "
                    f"(available: {', '.join(sorted(REGISTRY))})")


# ---- compatibility ---------------------------------------------------------------------------------------
def check_compatible(sae: SparseAutoencoder, *, d_model: int | None = None, hook: str | None = None,
                     model_name: str | None = None, against: str | None = None) -> None:
    """Refuse, in one line, an SAE that was not trained on this model's hook (it would run but mean nothing);
    `against` names what the expected values come from, appended to the message."""
    try:
        _check_compatible(sae, d_model, hook, model_name)
    except UserError as exc:
        raise UserError(f"{exc} ({against})" if against else str(exc)) from None


def _check_compatible(sae: SparseAutoencoder, d_model: int | None, hook: str | None,
                      model_name: str | None) -> None:
    origin = sae.provenance or Provenance(None, None, None, {})
    where = origin.source or "(in memory)"
    if d_model is not None and sae.d_in != d_model:
        raise UserError(f"SAE at {where} takes {sae.d_in}-dimensional activations, "
                        f"but the model's d_model is {d_model}")
    theirs = origin.hook.full_name if origin.hook else None
    if hook is not None and theirs != hook:
        trained = f"was trained on {theirs}" if theirs else "does not record its hook"
        raise UserError(f"SAE at {where} {trained}, not {hook}")
    theirs = origin.model_name
    if model_name is not None and theirs != model_name:
        trained = f"was trained on model {theirs}" if theirs else "does not record its model"
        raise UserError(f"SAE at {where} {trained}, not {model_name}")
