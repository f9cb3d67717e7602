"""Stage `train`: the activation cache -> a trained SAE's checkpoints and metrics under models/runs/<run_name>/.

Under `torchrun --nproc-per-node N -m saepipe train` it trains data-parallel (`training.parallel`): each
process reads its block of every global batch, rank 0 alone validates, writes checkpoints, dvclive and
history, and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import tempfile
from pathlib import Path

import torch

import saepipe
from saepipe.activations.run_name import names_run
from saepipe.config import Params, flat_values
from saepipe.corpus.tokens import read_token_cache
from saepipe.distributed import World
from saepipe.errors import UserError, field_error
from saepipe.model.hooks import HookSpec
from saepipe.model.loading import load_hooked_model, resolve_device
from saepipe.paths import activation_cache, checkpoints_dir, run_dir
from saepipe.sae import build_sae, config_from_params
from saepipe.sae.formats import export_sae
from saepipe.sae.provenance import RunRecord
from saepipe.storage import plain, sha256_file
from saepipe.text import count
from saepipe.training.checkpoints import BEST, load_checkpoint
from saepipe.training.data import ActivationData, load_activation_data
from saepipe.training.end_to_end import make_end_to_end_loss
from saepipe.training.parallel import rows_needed
from saepipe.training.tracking import Tracker
from saepipe.training.trainer import EndToEndLoss, Trainer

CACHE_ATTRS = ("model_name", "hook", "d_model", "tokenizer_name",
               "tokenizer_fingerprint", "prepend_bos", "max_text_length", "context_overlap", "forward_dtype",
               "storage_dtype", "outlier_threshold")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(saepipe.__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_record(params: Params, data: ActivationData, cache_path: Path, sha256: bool = True) -> RunRecord:
    """What an exported SAE records about where it came from: model, hook, scale, data and code versions."""
    attrs = data.attrs
    return RunRecord(
        run_name=params.train.run_name,
        model_name=attrs["model_name"],
        hook=HookSpec.parse(attrs["hook"]),
        d_in=data.d_in,
        activation_scale=data.scale,
        normalize_activations=params.train.normalize_activations,
        prepend_bos=bool(attrs["prepend_bos"]),
        context_size=int(attrs["max_text_length"]),
        train_config=flat_values(params.train),
        data={
            "activation_cache": str(cache_path),
            "activation_cache_sha256": sha256_file(cache_path) if sha256 else None,
            "train_rows": data.n_train,
            "validation_rows": int(data.validation.shape[0]),
            "outliers_left_out": data.dropped_outliers,
            "cache_attrs": {k: plain(attrs[k]) for k in CACHE_ATTRS if k in attrs},
        },
        code={"saepipe": saepipe.__version__, "git_commit": git_commit(), "torch": torch.__version__},
    )


def end_to_end_loss(params: Params, data: ActivationData, device: torch.device) -> EndToEndLoss:
    """The model in the loop: splice reconstructions at the cache's hook and score the rest of the run."""
    cfg = params.train.end_to_end
    attrs = data.attrs
    tokens = read_token_cache(params.tokenize.output, matching=attrs)
    model = load_hooked_model(params.base_model.output_dir, device=device, dtype=attrs["forward_dtype"])
    hook = HookSpec.parse(attrs["hook"])
    if model.cfg.d_model != data.d_in:
        raise UserError(f"model in {params.base_model.output_dir} has d_model {model.cfg.d_model}, but the "
                        f"activation cache has {data.d_in}; rerun `saepipe activations`")
    bos_id = int(attrs["bos_token_id"]) if attrs["prepend_bos"] else None
    return make_end_to_end_loss(
        model, hook, tokens, n_windows=cfg.end_to_end_windows,
        window=int(attrs["max_text_length"]) - int(bos_id is not None), logit_kl=cfg.use_logit_kl,
        block_mse=cfg.use_block_mse, logit_kl_weight=cfg.logit_kl_weight, block_mse_weight=cfg.block_mse_weight,
        seed=params.train.seed, bos_id=bos_id,
    )


def check_parallel(params: Params, world: World) -> None:
    """What data-parallel training needs of the params, checked before any data is read."""
    cfg = params.train
    if cfg.batch_size % world.size:
        raise field_error("train.batch_size", cfg.batch_size,
                          f"a multiple of the {world.size} torchrun processes (each takes batch_size / "
                          f"{world.size} rows of every batch)")
    if cfg.end_to_end.use_end_to_end:
        raise field_error("train.use_end_to_end", True, f"false under torchrun ({world.size} processes): "
                          "end-to-end losses train in one process")


@names_run
def run(params: Params) -> None:
    cfg = params.train
    device = resolve_device(cfg.device, "train.device")
    with World.from_env(device) as world:
        _train(params, world.device(device), world)


def _train(params: Params, device: torch.device, world: World) -> None:
    cfg = params.train
    shard = None
    if world.distributed:
        check_parallel(params, world)

        def shard(n_rows: int):
            return rows_needed(n_rows, cfg.batch_size, cfg.seed, range(1, cfg.epochs(n_rows) + 1), world)

    cache_path = activation_cache(params)
    data = load_activation_data(cache_path, include_outliers=cfg.include_outliers,
                                max_train_rows=cfg.max_train_rows, normalize=cfg.normalize_activations,
                                seed=cfg.seed, hook=cfg.hook, shard=shard, validation=world.is_main)
    torch.manual_seed(cfg.seed)
    sae = build_sae(config_from_params(dataclasses.asdict(cfg.sae), data.d_in))
    ckpt_dir = checkpoints_dir(params)
    record = run_record(params, data, cache_path, sha256=world.is_main)
    say = print if world.is_main else _quiet
    parallel = f" x {world.size} processes ({data.train.shape[0]:,} rows on rank 0)" if world.distributed else ""
    say(f"train: {cfg.sae.sae_type} SAE {data.d_in} -> {sae.d_sae} on {record.hook.full_name}, "
        f"{data.n_train:,} train / {data.validation.shape[0]:,} validation rows "
        f"({count(sum(data.dropped_outliers.values()), 'outlier')} left out), scale {data.scale:.4g}, "
        f"{device}{parallel}")
    e2e = end_to_end_loss(params, data, device) if cfg.end_to_end.use_end_to_end else None
    tracking = Tracker(cfg, run_dir(params), record.to_dict()) if world.is_main else contextlib.nullcontext()
    with tracking as tracker:
        result = Trainer(sae, data, cfg, ckpt_dir, record, device, logger=tracker, end_to_end=e2e,
                         world=world).fit()
        if not world.is_main:
            return
        if cfg.tracking.enabled and cfg.tracking.wandb_log_final_artifact:
            with tempfile.TemporaryDirectory() as tmp:  # the same export `saepipe export` writes
                final = Path(tmp) / cfg.run_name
                best = load_checkpoint(ckpt_dir / BEST)
                export_sae(best.sae, record, best.history, final, best.identity())
                tracker.log_final_artifact(final)
    final = result.history[-1]
    best_epoch = result.history[result.best_epoch - 1]
    print(f"train: {cfg.run_name}: best epoch {result.best_epoch} (val fvu "
          f"{best_epoch.get('val_fvu', float('nan')):.4f}, val l0 {best_epoch.get('val_l0', float('nan')):.1f}); "
          f"final dead {final['dead_feature_percentage']:.1f}% -> {run_dir(params)} [{result.seconds:.0f} s]")


def _quiet(*args: object) -> None:
    """`print` on the ranks other than 0."""
