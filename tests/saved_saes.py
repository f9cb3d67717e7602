"""Small SAEs of every architecture, trained a little and saved as checkpoints, for the export and publish tests.

Plain functions rather than fixtures: the tests build several checkpoints each, with different epochs and types.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saepipe.sae import REGISTRY, build_sae, config_class
from saepipe.sae.formats import export_sae
from saepipe.training.checkpoints import load_checkpoint, save_checkpoint

SCALE = 0.37
D_IN, D_SAE, K = 16, 64, 4
LAYER, HOOK = 1, "hook_resid_post"
HOOK_SPEC = f"blocks.{LAYER}.{HOOK}"
MODEL = "tiny/model"
ARCHS = sorted(REGISTRY)
HISTORY = [
    {"epoch": 1, "loss": 0.5, "fvu": 0.4, "l0": 5.0, "val_loss": 0.45, "val_fvu": 0.31234, "val_l0": 4.5},
    {"epoch": 2, "loss": 0.3, "fvu": 0.2, "l0": 4.2, "val_loss": 0.25, "val_fvu": 0.12345, "val_l0": 3.875},
]


def trained_sae(sae_type: str, seed: int = 0):
    """An SAE after two real optimizer steps on scaled inputs, then perturbed so nothing is at its init."""
    torch.manual_seed(seed)
    cfg = config_class(sae_type).from_dict(dict(d_in=D_IN, d_sae=D_SAE, k=K, k_aux=8, matryoshka_prefixes=[D_SAE // 4]))
    sae = build_sae(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(2):
        x = SCALE * torch.randn(64, D_IN) * 3
        out = sae(x)
        (out.recon_loss + 0.01 * out.sparsity_loss).backward()
        opt.step()
        opt.zero_grad()
        sae.after_step(out)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if "threshold" in dict(sae.named_buffers()):  # BatchTopK's running threshold, as after_step would set it
            sae.threshold.copy_(0.05 + 0.2 * torch.rand_like(sae.threshold))
    return sae


def run_state(epoch: int = 2, run_name: str = "r1") -> dict:
    return {
        "epoch": epoch, "step": 10 * epoch, "tokens_seen": 640 * epoch, "best_val_loss": 0.25, "best_epoch": epoch,
        "run": {
            "run_name": run_name, "model_name": MODEL, "hook": HOOK_SPEC,
            "d_in": D_IN, "activation_scale": SCALE, "normalize_activations": True, "dtype": "float32",
            "prepend_bos": True, "context_size": 128,
            "train_config": {"run_name": run_name, "num_epochs": 2, "lr": 5e-4},
            "data": {"activation_cache": "data/activations/activations.h5", "train_rows": 1000},
            "code": {"saepipe": "0.1.0", "git_commit": None},
        },
    }


def make_checkpoint(path: Path, sae_type: str, epoch: int = 2, run_name: str = "r1"):
    save_checkpoint(path, trained_sae(sae_type), run_state(epoch, run_name), HISTORY[:epoch],
                    {"last_fired": torch.zeros(D_SAE)})
    return load_checkpoint(path)


def export(ckpt, out: Path) -> None:
    export_sae(ckpt.sae, ckpt.run_record(), ckpt.history, out, ckpt.identity())
