"""Upload an exported SAE to the Hugging Face hub, with a generated model card.

Each SAE goes to its own folder of the repository (`path_in_repo`, the run name by default), the
layout SAELens expects of a repository holding several SAEs: `SAE.from_pretrained(release=repo_id,
sae_id=folder)` loads one of them. The export directory itself is never modified: the card is
written into a staging copy. The token (argument, HF_TOKEN, or `hf auth login`) is never printed,
and is scrubbed from any hub error before that error is shown.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from saepipe.errors import UserError
from saepipe.sae import REGISTRY
from saepipe.sae.formats import CONFIG, HISTORY, load_sae
from saepipe.storage import read_json

REPO_ENV = "SAE_HF_REPO_ID"
CARD = "README.md"
# metrics shown first in the card, when the history has them
HEADLINE = ("val_fvu", "val_explained_variance", "val_l0", "val_cos_sim", "val_loss", "val_dead_feature_percentage",
            "fvu", "l0", "loss", "dead_feature_percentage")



def calibration_line(calibration: dict[str, Any] | None) -> str:
    """The model card's row for a calibrated inference threshold (BatchTopK, Matryoshka), or nothing."""
    if not calibration:
        return ""
    return (f"| inference threshold | {calibration['threshold']:.6g}, calibrated so that {calibration.get('rows')} "
            f"training tokens keep {calibration.get('train_l0'):.4g} latents each on average |\n")

def resolve_repo_id(repo_id: str | None) -> str:
    repo_id = repo_id or os.environ.get(REPO_ENV) or None
    if repo_id is None:
        raise UserError(f"no Hugging Face repository to upload to: set export.hf_repo_id "
                        f"(--hf-repo-id user/name) or the {REPO_ENV} environment variable")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"Hugging Face repository {repo_id!r}: expected 'user/name' (export.hf_repo_id)")
    return repo_id


def resolve_token(token: str | None) -> str:
    """The token to upload with (the argument, HF_TOKEN, or the one `hf auth login` stored), found before any
    network call: without one the hub answers with a resolver or 401 error that names no remedy."""
    from huggingface_hub import get_token

    found = token or os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return found


def final_metrics(config: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, float]:
    """The exported epoch's metrics (the checkpoint's own epoch, else the last one recorded)."""
    if not history:
        return {}
    epoch = (config.get("checkpoint") or {}).get("epoch")
    entry = next((h for h in history if isinstance(h, dict) and h.get("epoch") == epoch), history[-1])
    numbers = {k: float(v) for k, v in entry.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch"}
    ordered = {k: numbers[k] for k in HEADLINE if k in numbers}
    ordered.update({k: v for k, v in numbers.items() if k not in ordered})
    return ordered


def saelens_name(sae_type: str) -> str:
    return REGISTRY[sae_type].config_class.saelens_architecture if sae_type in REGISTRY else "?"


def model_card(config: dict[str, Any], history: list[dict[str, Any]], repo_id: str, folder: str) -> str:
    """README.md: what the SAE was trained on, how well it does, and how to load it (saepipe and SAELens)."""
    sae_type = config.get("sae_type", "?")
    hook = config.get("hook", "?")
    model = config.get("model_name", "?")
    norm = config.get("normalization") or {}
    ckpt = config.get("checkpoint") or {}
    training = config.get("training") or {}
    code = config.get("code") or {}
    k = config.get("k")  # the architectures with k have it in their config; the others have none
    k_line = f"| k (active latents per token{', batch average' if sae_type != 'topk' else ''}) | {k} |\n"
    rows = [
        f"| base model | `{model}` |\n",
        f"| hook | `{hook}` |\n",
        f"| architecture | {sae_type} (SAELens: {saelens_name(sae_type)}) |\n",
        f"| d_in -> d_sae | {config.get('d_in')} -> {config.get('d_sae')} |\n",
        k_line if k is not None else "",
        calibration_line(config.get("calibration")),
        f"| checkpoint | {ckpt.get('name')} (epoch {ckpt.get('epoch')}, {ckpt.get('tokens_seen')} tokens) |\n",
        f"| context size / BOS | {config.get('context_size')} / {config.get('prepend_bos')} |\n",
        f"| input scale folded | {norm.get('activation_scale')} (takes raw activations) |\n",
        f"| trained with | saepipe {code.get('saepipe')} (commit {code.get('git_commit')}) |\n",
    ]
    metrics = final_metrics(config, history)
    metric_rows = "".join(f"| {name} | {value:.4g} |\n" for name, value in metrics.items()) or "| (none) | |\n"
    train_keys = ("num_epochs", "training_tokens", "batch_size", "lr", "sae_expansion", "topk", "aux_coefficient",
                  "sparsity_penalty", "normalize_activations", "seed")
    train_rows = "".join(f"| {key} | {training[key]} |\n" for key in train_keys if training.get(key) is not None)
    return (
        "---\ntags:\n- sparse-autoencoder\n- saelens\n- saepipe\n---\n\n"
        f"# {sae_type} SAE on `{model}` at `{hook}`\n\n"
        "A sparse autoencoder trained with saepipe. It encodes the raw activations of the hook above; any "
        "normalisation used in training is folded into the weights.\n\n"
        "| | |\n|---|---|\n" + "".join(rows) + "\n"
        "## Final metrics\n\n| metric | value |\n|---|---|\n" + metric_rows + "\n"
        "FVU is the fraction of variance unexplained; L0 the mean number of active latents per token; `val_` "
        "metrics are on held-out documents.\n\n"
        "## Training\n\n| parameter | value |\n|---|---|\n" + (train_rows or "| (unrecorded) | |\n") + "\n"
        "## Loading\n\nWith saepipe:\n\n```python\nfrom huggingface_hub import snapshot_download\n"
        "import saepipe\n\n"
        f'local = snapshot_download("{repo_id}", allow_patterns=["{folder}/*"])\n'
        f'sae = saepipe.load_sae(f"{{local}}/{folder}")\n'
        "features = sae.encode(activations)  # [tokens, d_in] raw activations -> [tokens, d_sae]\n```\n\n"
        "With SAELens (>= 6):\n\n```python\nfrom sae_lens import SAE\n\n"
        f'sae = SAE.from_pretrained(release="{repo_id}", sae_id="{folder}")\n'
        f'# or, from a local copy: SAE.load_from_disk(f"{{local}}/{folder}")\n```\n\n'
        "Files: `weights.pt` + `config.json` + `history.json` (saepipe) and `cfg.json` + "
        "`sae_weights.safetensors` (SAELens).\n"
    )


def _secrets(token: str | None) -> list[str]:
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        found.append(get_token())
    except Exception:  # a missing or unreadable token file only means nothing to scrub
        pass
    return [s for s in found if s]


def _one_line(exc: BaseException, secrets: list[str]) -> str:
    text = str(exc) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line[:300]


def upload_sae(sae_dir: str | Path, repo_id: str | None, private: bool, token: str | None = None, *,
               path_in_repo: str | None = None) -> str:
    """Upload `sae_dir` (an export) to `<repo_id>/<path_in_repo>/` with a model card; returns its URL."""
    from huggingface_hub import HfApi

    sae_dir = Path(sae_dir)
    repo_id = resolve_repo_id(repo_id)
    folder = path_in_repo or sae_dir.name
    config = read_json(sae_dir / CONFIG, "exported SAE config (run `saepipe export` first)")
    history = read_json(sae_dir / HISTORY, "exported SAE history (run `saepipe export` first)")
    if not isinstance(config, dict) or not isinstance(history, list):
        raise UserError(f"{sae_dir}: config.json / history.json are not what `saepipe export` writes")
    token = resolve_token(token)
    secrets = _secrets(token)
    with tempfile.TemporaryDirectory(prefix="saepipe-upload-") as tmp:
        staging = Path(tmp) / folder.replace("/", "_")
        staging.mkdir()
        for file in sae_dir.iterdir():
            if file.is_file() and file.name != CARD:
                _link_or_copy(file, staging / file.name)
        (staging / CARD).write_text(model_card(config, history, repo_id, folder), encoding="utf-8")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(staging), path_in_repo=folder, repo_type="model",
                              commit_message=f"Upload SAE {folder} ({config.get('sae_type')}, "
                                             f"{config.get('hook')})")
        except Exception as exc:  # hub, HTTP and auth failures alike: one line, token scrubbed
            raise UserError(f"Hugging Face upload to {repo_id} failed: {_one_line(exc, secrets)}") from None
    return f"https://huggingface.co/{repo_id}/tree/main/{folder}"


def publish_export(sae_dir: Path, repo_id: str | None, private: bool) -> None:
    """What `saepipe upload` and `export.upload_to_hf` do: check the repo id and the export, upload, say where."""
    repo_id = resolve_repo_id(repo_id)  # before any work: a missing repo id or token is the usual mistake
    resolve_token(None)
    load_sae(sae_dir)  # refuse a damaged export before anything leaves the machine
    url = upload_sae(sae_dir, repo_id, private, path_in_repo=sae_dir.name)
    print(f"uploaded {sae_dir} to {url}{' (private)' if private else ''}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
