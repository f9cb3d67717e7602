"""Stage `activations`: token cache + base model -> the hook's activations in HDF5.

One hook in one process writes `activations.h5` itself. Several hooks (`activations.hooks`, one forward
pass for all) or several processes (`torchrun -m saepipe activations`: rank r runs every world_size-th
window batch) write shard files under `parts/` and rank 0 a manifest `activations.h5` over them
(`activations.manifest`), which later stages read the same way.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saepipe.activations.cache import ActivationCacheWriter
from saepipe.activations.extract import WindowBatch, extract, extract_hooks
from saepipe.activations.manifest import shard_path, write_manifest
from saepipe.activations.windows import WindowPlan, batch_windows, padding_fraction, plan_windows, sample_documents
from saepipe.config import ActivationsConfig, Params
from saepipe.corpus.tokens import TRAIN, VALIDATION, TokenCache, read_token_cache
from saepipe.distributed import World
from saepipe.errors import UserError, field_error
from saepipe.model.hooks import HookSpec, block_hook_names, resolve_hook
from saepipe.model.loading import check_4bit, load_hooked_model, resolve_device
from saepipe.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from saepipe.paths import ACTIVATION_CACHE, ACTIVATION_STATS, SHARDS, SHARDS_NOTE
from saepipe.storage import write_json
from saepipe.text import count


def split_sink(writer: ActivationCacheWriter, doc_split: np.ndarray) -> Callable[[torch.Tensor, WindowBatch], None]:
    """Route each batch's rows to the train or validation group by their document's split."""

    def sink(rows: torch.Tensor, wb: WindowBatch) -> None:
        is_val = doc_split[wb.doc_ids] == VALIDATION
        for split, mask in (("train", ~is_val), ("validation", is_val)):
            if mask.any():
                select = torch.from_numpy(mask)
                writer.append(split, rows[select], wb.token_ids[mask], wb.doc_ids[mask], wb.positions[mask])

    return sink


def plan_documents(tokens: TokenCache, cfg: ActivationsConfig, tokens_path: str) -> WindowPlan:
    """Windows over every document, or over the seeded `max_tokens` sample; both splits must keep a row."""
    plan = plan_windows(tokens.lengths(), cfg.max_text_length - int(cfg.prepend_bos), cfg.overlap(),
                        cfg.prepend_bos)
    doc_rows = plan.document_rows(tokens.n_documents)
    if cfg.max_tokens is not None:
        plan = plan.select(np.isin(plan.doc, sample_documents(doc_rows, tokens.split, cfg.max_tokens, cfg.seed)))
    for value, name in ((TRAIN, "train"), (VALIDATION, "validation")):
        if not doc_rows[tokens.split == value].any():
            raise UserError(f"{tokens_path}: no {name} document is long enough to cache a row "
                            f"(tokenize.val_fraction={tokens.attrs['val_fraction']:g}); "
                            "change the split or add longer documents")
    return plan


def resolve_hooks(cfg: ActivationsConfig, n_layers: int, available: list[str]) -> list[HookSpec]:
    """`activations.hooks` checked against the model, else the one hook of hook_layer and hook_name."""
    if cfg.hooks is None:
        return [resolve_hook(cfg.hook_layer, cfg.hook_name, cfg.middle_layer_strategy, n_layers, available)]
    hooks = []
    for full_name in cfg.hooks:
        try:
            hook = HookSpec.parse(full_name)
        except ValueError:
            raise field_error("activations.hooks", cfg.hooks, f"full hook names (blocks.<layer>.<hook name>); "
                              f"{full_name!r} is not one") from None
        if not 0 <= hook.layer < n_layers:
            raise field_error("activations.hooks", cfg.hooks, f"layers in [0, {n_layers - 1}] ({n_layers} layers); "
                              f"{full_name!r} is not")
        if hook.name not in available:
            raise field_error("activations.hooks", cfg.hooks, f"hooks inside a block; {full_name!r} is not one "
                              f"(e.g. blocks.{hook.layer}.hook_resid_post)")
        hooks.append(hook)
    if not hooks or len(set(hooks)) < len(hooks):
        raise field_error("activations.hooks", cfg.hooks, "a non-empty list of distinct hooks, or null")
    return hooks


def tidy_parts(out_dir: Path, keep: set[Path]) -> None:
    """`parts/` (a DVC output) holds exactly this run's shards, and a note saying what the folder is for (so
    that after a one-file run it is not empty: DVC warns of an empty dependency)."""
    parts = out_dir / SHARDS
    parts.mkdir(parents=True, exist_ok=True)
    for path in parts.iterdir():
        if path not in keep and path.name != SHARDS_NOTE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (parts / SHARDS_NOTE).write_text("The shard files of a multi-process or several-hook activation cache (then "
                                     "../activations.h5 is a manifest over them); none after a one-file run.\n")


def run(params: Params) -> None:
    device = resolve_device(params.activations.device)
    with World.from_env(device) as world:
        _run(params, world.device(device), world)


def _run(params: Params, device: torch.device, world: World) -> None:
    cfg = params.activations
    started = time.perf_counter()
    if cfg.load_in_4bit:
        check_4bit(device)
    tokens = read_token_cache(params.tokenize.output)
    model_dir = params.base_model.output_dir
    tokenizer = load_tokenizer(model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if tokens.attrs["tokenizer_fingerprint"] != fingerprint:
        raise UserError(f"{params.tokenize.output} was tokenized with a different tokenizer "
                        f"({tokens.attrs['tokenizer_name']}) than the model in {model_dir}; "
                        "rerun `saepipe tokenize`")
    bos_id = None
    if cfg.prepend_bos:
        if tokenizer.bos_token_id is None:
            raise field_error("activations.prepend_bos", True, "false: this tokenizer has no BOS token")
        bos_id = int(tokenizer.bos_token_id)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    model = load_hooked_model(model_dir, device=device, dtype=cfg.forward_dtype, load_in_4bit=cfg.load_in_4bit)
    n_layers, d_model, n_ctx = model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx
    hooks = resolve_hooks(cfg, n_layers, block_hook_names(model.hook_dict))
    hook = hooks[0]
    if n_ctx and cfg.max_text_length > n_ctx:
        raise field_error("activations.max_text_length", cfg.max_text_length,
                          f"at most the model's context length {n_ctx}")

    plan = plan_documents(tokens, cfg, params.tokenize.output)
    model_lengths = plan.length + int(cfg.prepend_bos)
    budget = cfg.activation_batch_size * cfg.max_text_length
    batches = batch_windows(model_lengths, budget)
    attrs = {
        "model_name": params.base_model.model_name,
        "model_dir": str(model_dir),
        "hook": hook.full_name,
        "n_layers": n_layers,
        "tokenizer_name": tokens.attrs["tokenizer_name"],
        "tokenizer_fingerprint": fingerprint,
        "prepend_bos": cfg.prepend_bos,
        "bos_token_id": -1 if bos_id is None else bos_id,
        "max_text_length": cfg.max_text_length,
        "context_overlap": cfg.overlap(),
        "forward_dtype": cfg.forward_dtype,
        "windows": len(plan),
        "documents": len(np.unique(plan.doc)),
        "max_tokens": -1 if cfg.max_tokens is None else cfg.max_tokens,
        "sample_seed": cfg.seed,
        "batch_token_budget": budget,
        "model_tokens": int(model_lengths.sum()),
        "cached_rows": plan.cached_rows,
        "recompute_factor": int(model_lengths.sum()) / plan.cached_rows,
        "padding_fraction": padding_fraction(model_lengths, batches),
    }
    out_dir = Path(cfg.output_dir)
    if world.distributed or len(hooks) > 1:
        _run_sharded(params, model, hooks, plan, batches, tokens, attrs, (bos_id, pad_id), device, world, started)
        return
    writer = ActivationCacheWriter(out_dir / ACTIVATION_CACHE, d_model, cfg.storage_dtype, cfg.outlier_factor, attrs)

    sink = split_sink(writer, tokens.split)
    forward_started = time.perf_counter()
    try:
        model_tokens = extract(model, hook, plan, batches, tokens, bos_id, pad_id, device, sink)
        forward_seconds = time.perf_counter() - forward_started
        summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    stats = {
        "hook": hook.full_name,
        "d_model": d_model,
        **{k: attrs[k] for k in ("windows", "documents", "model_tokens", "cached_rows", "recompute_factor",
                                 "padding_fraction")},
        "max_tokens": cfg.max_tokens,
        "forward_passes": len(batches),  # extract() runs the model once per batch
        "tokens_per_second": model_tokens / forward_seconds,
        **summary,
        "storage_dtype": cfg.storage_dtype,
        "forward_dtype": cfg.forward_dtype,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / ACTIVATION_STATS, stats)
    tidy_parts(out_dir, set())
    size = (out_dir / ACTIVATION_CACHE).stat().st_size
    outliers = summary["train"]["outliers"] + summary["validation"]["outliers"]
    print(
        f"activations: {hook.full_name}, {summary['train']['rows']:,} train + "
        f"{summary['validation']['rows']:,} validation rows x {d_model} from {attrs['documents']:,}"
        f"{'' if cfg.max_tokens is None else ' sampled'} of {count(tokens.n_documents, 'document')} "
        f"({cfg.storage_dtype}, {size / 2**20:,.0f} MiB); {count(outliers, 'outlier row')} "
        f"above {summary['outlier_threshold']:.4g} "
        f"(= {cfg.outlier_factor:g} x median norm {summary['median_norm']:.4g}); "
        f"{count(len(batches), 'forward pass', 'forward passes')}, {stats['tokens_per_second']:,.0f} tok/s, "
        f"recompute x{attrs['recompute_factor']:.2f} "
        f"-> {out_dir / ACTIVATION_CACHE} [{stats['seconds']:.0f} s]"
    )


def _run_sharded(params: Params, model, hooks: list[HookSpec], plan: WindowPlan, batches: list[np.ndarray],
                 tokens: TokenCache, attrs: dict, ids: tuple[int | None, int], device: torch.device, world: World,
                 started: float) -> None:
    """This rank's window batches through the model once for every hook, into one shard per hook; then
    rank 0 writes the manifest, the stats and the summary line."""
    cfg = params.activations
    out_dir = Path(cfg.output_dir)
    common = {k: v for k, v in attrs.items() if k != "hook"}
    if world.is_main:
        tidy_parts(out_dir, set())  # no shard of an earlier run may stay beside this run's
    world.barrier()
    d_model = model.cfg.d_model
    writers = [ActivationCacheWriter(shard_path(out_dir, h.full_name, world.rank), d_model, cfg.storage_dtype,
                                     cfg.outlier_factor, {**common, "hook": h.full_name, "rank": world.rank},
                                     shard=True)
               for h in hooks]
    sinks = [split_sink(writer, tokens.split) for writer in writers]

    def sink(rows: list[torch.Tensor], wb: WindowBatch) -> None:
        for hook_sink, hook_rows in zip(sinks, rows, strict=True):
            hook_sink(hook_rows, wb)

    forward_started = time.perf_counter()
    try:
        model_tokens = extract_hooks(model, hooks, plan, batches[world.rank :: world.size], tokens, *ids, device,
                                     sink, progress=world.is_main)
        forward_seconds = time.perf_counter() - forward_started
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    model_tokens = world.sum_int(model_tokens)
    world.barrier()
    if not world.is_main:
        return
    shards = {h.full_name: [shard_path(out_dir, h.full_name, r) for r in range(world.size)] for h in hooks}
    summaries = write_manifest(out_dir / ACTIVATION_CACHE, shards, common, world.size)
    first = summaries[hooks[0].full_name]
    stats = {
        "hook": hooks[0].full_name,
        "hooks": {name: summary for name, summary in summaries.items()} if len(hooks) > 1 else None,
        "world_size": world.size,
        "d_model": d_model,
        **{k: attrs[k] for k in ("windows", "documents", "model_tokens", "cached_rows", "recompute_factor",
                                 "padding_fraction")},
        "max_tokens": cfg.max_tokens,
        "tokens_per_second": model_tokens / forward_seconds,
        **first,
        "storage_dtype": cfg.storage_dtype,
        "forward_dtype": cfg.forward_dtype,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / ACTIVATION_STATS, stats)
    size = sum(p.stat().st_size for p in (out_dir / SHARDS).glob("*.h5"))
    print(
        f"activations: {', '.join(shards)}, {first['train']['rows']:,} train + {first['validation']['rows']:,} "
        f"validation rows x {d_model} per hook from {count(attrs['documents'], 'document')} in "
        f"{count(world.size, 'process', 'processes')} ({cfg.storage_dtype}, {size / 2**20:,.0f} MiB in "
        f"{count(len(hooks) * world.size, 'shard')}); {stats['tokens_per_second']:,.0f} tok/s, recompute "
        f"x{attrs['recompute_factor']:.2f} -> {out_dir / ACTIVATION_CACHE} [{stats['seconds']:.0f} s]"
    )
