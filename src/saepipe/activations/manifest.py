"""A sharded or several-hook activation cache: shard files under `parts/` and `activations.h5` as manifest.

When `saepipe activations` runs in several processes (torchrun) or caches several hooks, each process
writes one shard file per hook, `parts/<hook>.rank<r>.h5` (the cache layout of `activations.cache`
without the statistics, plus each split's float64 row `sum`), and rank 0 then writes `activations.h5`:

    attrs         the cache's attrs (model, tokenizer, windows ...), layout="manifest", hooks (full names),
                  world_size
    <hook>/       one group per hook, e.g. `blocks.3.hook_resid_post/`; attrs hook (its full name), d_model,
                  median_norm, outlier_threshold, roundtrip_rel_error_mean / _max, shard_files (relative to
                  the manifest) and, per split, <split>_shard_rows
        train/, validation/   as in a single-file cache: `activations` is an HDF5 virtual dataset over
                  the shards' rows (rank 0's first), the per-row fields are copied, and `outlier`, `mean`
                  and the group attrs are computed over all shards, so they equal a single-process cache's

`ActivationCache` (`activations.cache`, the reader of both layouts) reads it like a single file (`hook=` picks
the group); its `check_shards` makes a missing or replaced shard an error on open instead of rows of zeros (what
HDF5 returns for a missing source).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from saepipe.activations.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROW_FIELDS,
    SPLITS,
    finish_split,
)
from saepipe.errors import UserError
from saepipe.paths import SHARDS
from saepipe.storage import atomic_path


def shard_path(out_dir: Path, hook: str, rank: int) -> Path:
    return Path(out_dir) / SHARDS / f"{hook}.rank{rank}.h5"


def write_manifest(path: Path, shards: dict[str, list[Path]], attrs: dict[str, Any], world_size: int
                   ) -> dict[str, dict[str, Any]]:
    """`activations.h5` over every hook's shard files (in rank order); returns each hook's summary."""
    path = Path(path)
    summaries: dict[str, dict[str, Any]] = {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out, ExitStack() as stack:
        out.attrs.update({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "layout": MANIFEST,
                          "hooks": list(shards), "world_size": world_size})
        for hook, files in shards.items():
            opened = [stack.enter_context(h5py.File(f, "r")) for f in files]
            summaries[hook] = _write_hook(out.create_group(hook), path.parent, files, opened)
        first = out[next(iter(shards))].attrs
        for name in ("d_model", "storage_dtype", "outlier_factor"):
            out.attrs[name] = first[name]
    return summaries


def _write_hook(group: h5py.Group, root: Path, files: list[Path], shards: list[h5py.File]) -> dict[str, Any]:
    head = shards[0].attrs
    storage_dtype, d_model, factor = str(head["storage_dtype"]), int(head["d_model"]), float(head["outlier_factor"])
    train_norms = np.concatenate([s["train"]["norms"][:] for s in shards])
    if len(train_norms) == 0:
        raise UserError("no training rows were cached: the corpus is too small for this window "
                        "(check activations.max_text_length and the token cache)")
    median = float(np.median(train_norms))
    threshold = factor * median
    total_rows = sum(int(s.attrs["rows"]) for s in shards)
    err_sum = sum(float(s.attrs["roundtrip_rel_error_sum"]) for s in shards)
    summary: dict[str, Any] = {"median_norm": median, "outlier_threshold": threshold,
                               "roundtrip_rel_error_mean": err_sum / total_rows if total_rows else 0.0,
                               "roundtrip_rel_error_max": max(float(s.attrs["roundtrip_rel_error_max"])
                                                               for s in shards)}
    group.attrs["hook"] = head["hook"]
    group.attrs.update({"d_model": d_model, "storage_dtype": storage_dtype, "outlier_factor": factor, **summary,
                        "shard_files": [os.path.relpath(f, root) for f in files]})
    for split in SPLITS:
        counts = [s[split]["activations"].shape[0] for s in shards]
        group.attrs[f"{split}_shard_rows"] = counts
        target = group.create_group(split)
        source = shards[0][split]["activations"]
        layout = h5py.VirtualLayout(shape=(sum(counts), d_model), dtype=source.dtype)
        start = 0
        for file, count in zip(files, counts, strict=True):
            if count:
                layout[start : start + count] = h5py.VirtualSource(os.path.relpath(file, root), f"{split}/activations",
                                                                   shape=(count, d_model))
            start += count
        target.create_virtual_dataset("activations", layout)
        for name, dtype in ROW_FIELDS.items():
            target.create_dataset(name, data=np.concatenate([s[split][name][:] for s in shards]).astype(dtype))
        total = np.sum([s[split]["sum"][:] for s in shards], axis=0)
        summary[split] = finish_split(target, target["norms"][:], threshold, total, storage_dtype)
    return summary
