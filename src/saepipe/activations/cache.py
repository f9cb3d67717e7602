"""The activation cache (`data/activations/activations.h5`): one hook's activations, one row per token.

Layout (HDF5):
    attrs         format="saepipe.activations", format_version, model_name, hook ("blocks.L.<name>", read
                  by `model.hooks.HookSpec.parse`), n_layers, d_model, tokenizer_name, tokenizer_fingerprint,
                  prepend_bos, max_text_length, context_overlap, forward_dtype, storage_dtype, outlier_factor,
                  outlier_threshold (= outlier_factor x the train split's median norm), median_norm,
                  roundtrip_rel_error_mean / _max (storage dtype vs the forward's float32 rows),
                  model_tokens, cached_rows, recompute_factor, padding_fraction
    train/ and validation/, each:
        activations  [rows, d_model]  float32 | float16 | uint16 holding bfloat16 bits (see attrs)
        token_ids    int32 [rows]     the token at that row
        doc_ids      int32 [rows]     document index in the token cache
        positions    int32 [rows]     position within its document
        norms        float32 [rows]   L2 norm of the float32 activation, before storage rounding
        outlier      bool [rows]      norm > outlier_threshold: massive-activation rows
        mean         float64 [d_model]  mean activation over the split's non-outlier rows
        attrs: rows, outliers, mean_norm (non-outlier rows), median_norm

Rows are grouped by window batch, not sorted; (doc_ids, positions) place each row in the corpus.
This module is the only reader and writer of that layout. A cache written by several processes or for
several hooks is a manifest over shard files (`activations.manifest`); `ActivationCache` reads both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saepipe.errors import UserError, field_error
from saepipe.storage import OpenFile, atomic_h5, check_writes, is_disk_full, no_space_error, open_h5, plain

FORMAT = "saepipe.activations"
FORMAT_VERSION = 2  # 2: the hook is one attribute, `hook`
SPLITS = ("train", "validation")
ROW_FIELDS = {"token_ids": np.int32, "doc_ids": np.int32, "positions": np.int32, "norms": np.float32}
CHUNK_ROWS = 1024
MANIFEST = "manifest"
SHARD = "shard"


def to_storage(acts: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """float32 rows -> the on-disk representation (bfloat16 travels as its uint16 bit pattern)."""
    if storage_dtype == "bfloat16":
        return acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return acts.to(getattr(torch, storage_dtype)).numpy()


def stored_tensor(stored: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """The on-disk rows as a tensor of the storage dtype, without a copy."""
    if storage_dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(stored))


def from_storage(stored: np.ndarray, storage_dtype: str) -> torch.Tensor:
    return stored_tensor(stored, storage_dtype).float()


def _numpy_dtype(storage_dtype: str) -> type:
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[storage_dtype]


class ActivationCacheWriter:
    """Streams rows into the cache under a temporary name; `close()` finalises stats and renames it."""

    def __init__(self, path: str | Path, d_model: int, storage_dtype: str, outlier_factor: float,
                 attrs: dict[str, Any], shard: bool = False):
        """With `shard`, the file is one process's share of a sharded cache: `close()` keeps the raw
        per-split sums, and the manifest (`activations.manifest`) derives the statistics over all shards."""
        self.path = Path(path)
        self.shard = shard
        self.storage_dtype = storage_dtype
        self.outlier_factor = outlier_factor
        self._stack = ExitStack()
        self.file = self._stack.enter_context(atomic_h5(self.path))
        self.file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs,
                                "storage_dtype": storage_dtype, "outlier_factor": outlier_factor,
                                "d_model": d_model, **({"layout": SHARD} if shard else {})})
        self.sums = {s: np.zeros(d_model, np.float64) for s in SPLITS}
        self.err_sum = 0.0
        self.err_max = 0.0
        for split in SPLITS:
            group = self.file.create_group(split)
            group.create_dataset("activations", shape=(0, d_model), maxshape=(None, d_model),
                                 dtype=_numpy_dtype(storage_dtype), chunks=(CHUNK_ROWS, d_model))
            for name, dtype in ROW_FIELDS.items():
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS * 16,))

    def rows(self, split: str) -> int:
        return self.file[split]["activations"].shape[0]

    def append(self, split: str, acts: torch.Tensor, token_ids: np.ndarray, doc_ids: np.ndarray,
               positions: np.ndarray) -> None:
        """Add float32 rows [n, d_model] with their token, document and position."""
        acts = acts.detach().float().cpu()
        norms = torch.linalg.vector_norm(acts, dim=1)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0])
            raise UserError(f"{self.path}: the model produced NaN or Inf activations (document {int(doc_ids[bad])}, "
                            f"position {int(positions[bad])}, activations.forward_dtype="
                            f"{self.file.attrs.get('forward_dtype')}); nothing was written; try float32")
        stored = to_storage(acts, self.storage_dtype)
        if self.storage_dtype != "float32":
            err = torch.linalg.vector_norm(from_storage(stored, self.storage_dtype) - acts, dim=1)
            rel = (err / norms.clamp_min(1e-12)).numpy()
            worst = float(rel.max(initial=0.0))
            if not math.isfinite(worst):  # float16 turns values beyond 65504 into Inf
                raise field_error("activations.storage_dtype", self.storage_dtype,
                                  "a dtype that holds these activations (one exceeds its range): bfloat16 or float32")
            self.err_sum += float(rel.sum())
            self.err_max = max(self.err_max, worst)
        self.sums[split] += acts.sum(0, dtype=torch.float64).numpy()
        group = self.file[split]
        start = self.rows(split)
        stop = start + len(acts)
        try:
            for name, values in (("activations", stored), ("token_ids", token_ids), ("doc_ids", doc_ids),
                                 ("positions", positions), ("norms", norms.numpy())):
                dataset = group[name]
                dataset.resize(stop, axis=0)
                dataset[start:stop] = values
            check_writes(self.file)
        except OSError as exc:
            if is_disk_full(exc, self.path.parent):
                raise no_space_error(self.path) from None
            raise

    def close(self) -> dict[str, Any]:
        """Flag outliers, write per-split statistics, rename into place; returns the summary."""
        total = sum(self.rows(s) for s in SPLITS)
        if self.shard:
            return self._close_shard(total)
        if self.rows("train") == 0:
            raise UserError("no training rows were cached: the corpus is too small for this window "
                            "(check activations.max_text_length and the token cache)")
        median = float(np.median(self.file["train"]["norms"][:]))
        threshold = self.outlier_factor * median
        summary: dict[str, Any] = {"median_norm": median, "outlier_threshold": threshold}
        for split in SPLITS:
            summary[split] = self._finish_split(split, threshold)
        self.file.attrs.update({
            "median_norm": median,
            "outlier_threshold": threshold,
            "roundtrip_rel_error_mean": self.err_sum / total if total else 0.0,
            "roundtrip_rel_error_max": self.err_max,
        })
        summary["roundtrip_rel_error_mean"] = self.file.attrs["roundtrip_rel_error_mean"]
        summary["roundtrip_rel_error_max"] = self.err_max
        self._stack.close()
        return summary

    def _close_shard(self, total: int) -> dict[str, Any]:
        for split in SPLITS:
            self.file[split].create_dataset("sum", data=self.sums[split])
        self.file.attrs.update({"roundtrip_rel_error_sum": self.err_sum, "roundtrip_rel_error_max": self.err_max,
                                "rows": total})
        self._stack.close()
        return {"rows": total}

    def _finish_split(self, split: str, threshold: float) -> dict[str, Any]:
        group = self.file[split]
        return finish_split(group, group["norms"][:], threshold, self.sums[split].copy(), self.storage_dtype)

    def abort(self) -> None:
        """Drop everything written so far (the temporary file is removed, nothing is renamed)."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def check_finite_rows(rows: torch.Tensor, path: Path, split: str, index: np.ndarray) -> None:
    """Refuse rows holding NaN or Inf (row `index[i]` of the split is rows[i]), naming the first."""
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        bad = int(index[int(torch.nonzero(~finite)[0])])
        raise UserError(f"{path}: {split} row {bad} holds NaN or Inf; the activation cache is damaged, "
                        "rerun `saepipe activations`")


def sae_hook(sae: Any) -> str | None:
    """The full hook name an exported SAE was trained on (to pick its hook in a several-hook cache)."""
    provenance = getattr(sae, "provenance", None)
    hook = getattr(provenance, "hook", None)
    return hook.full_name if hook is not None else None


def finish_split(group: h5py.Group, norms: np.ndarray, threshold: float, total: np.ndarray, storage_dtype: str
                 ) -> dict[str, Any]:
    """Write a split's `outlier` flags, `mean` (of the non-outlier rows, from `total`, the float64 sum of
    all rows, and the few outlier rows read back from `group["activations"]`) and its attrs."""
    outlier = norms > threshold
    group.create_dataset("outlier", data=outlier)
    rows = len(norms)
    kept = rows - int(outlier.sum())
    for index in np.flatnonzero(outlier):  # few: subtract them back out of the running sum
        total -= from_storage(group["activations"][index], storage_dtype).double().numpy()
    mean = total / kept if kept else total
    group.create_dataset("mean", data=mean)
    stats = {
        "rows": rows,
        "outliers": int(outlier.sum()),
        "mean_norm": float(norms[~outlier].mean()) if kept else 0.0,
        "median_norm": float(np.median(norms)) if rows else 0.0,
        "max_norm": float(norms.max()) if rows else 0.0,
    }
    group.attrs.update(stats)
    return stats


class ActivationCache(OpenFile):
    """Read access to a finished activation cache: a single file, or a manifest over per-rank shards and
    several hooks (`activations.manifest`), read the same way. `hook` picks one hook of a cache that holds
    several (its full name); a one-hook cache takes None or its own hook (any hook, with `strict=False`)."""

    def __init__(self, path: str | Path, hook: str | None = None, strict: bool = True):
        self.path = Path(path)
        self.file = open_h5(self.path, "activation cache", "activations")
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a saepipe activation cache (format={attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.path}: activation cache version {attrs.get('format_version')}, expected "
                            f"{FORMAT_VERSION}; rerun `saepipe activations`")
        root_attrs = {k: plain(v) for k, v in attrs.items()}
        if root_attrs.get("layout") == SHARD:
            raise UserError(f"{self.path} is one process's shard of an activation cache; open the cache's "
                            "activations.h5 instead")
        if isinstance(root_attrs.get("hooks"), np.ndarray):
            root_attrs["hooks"] = [str(h) for h in root_attrs["hooks"]]
        hooks = list(root_attrs.get("hooks", [root_attrs.get("hook")]))
        if not strict and hook not in hooks and len(hooks) == 1:
            hook = None  # the caller checks the one hook against what it needs, with its own message
        if hook is None and len(hooks) > 1:
            raise UserError(f"{self.path} holds several hooks ({', '.join(hooks)}); set train.hook to one of them")
        if hook is not None and hook not in hooks:
            raise UserError(f"{self.path} holds {', '.join(hooks)}, not {hook}; set train.hook to one of them "
                            "or rerun `saepipe activations` with that hook")
        self.hook: str = hook or hooks[0]
        self.root: h5py.Group = self.file
        self.attrs: dict[str, Any] = root_attrs
        if root_attrs.get("layout") == MANIFEST:
            self.root = self.file[self.hook]
            self.attrs = {**root_attrs, **{k: plain(v) for k, v in self.root.attrs.items()}}
            check_shards(self.path, self.root, SPLITS)
        self.storage_dtype: str = self.attrs["storage_dtype"]
        self._check_layout()

    def _check_layout(self) -> None:
        """Every split and field present with one row count: a file cut short or damaged fails here, on open."""
        for split in SPLITS:
            group = self.root.get(split)
            names = ("activations", *ROW_FIELDS, "outlier", "mean")
            try:
                missing = [n for n in names if group is None or n not in group]
                rows = {group[n].shape[0] for n in names[:-1]} if not missing else set()
            except (OSError, KeyError, RuntimeError) as exc:
                raise UserError(f"{self.path}: damaged activation cache ({exc}); rerun `saepipe activations`") from None
            if missing:
                raise UserError(f"{self.path}: {split}/{missing[0]} is missing; the activation cache is incomplete "
                                "or damaged, rerun `saepipe activations`")
            if len(rows) != 1:
                raise UserError(f"{self.path}: the {split} fields disagree on the row count; rerun "
                                "`saepipe activations`")

    def dataset(self, split: str) -> h5py.Dataset:
        """The split's activations dataset (rows at storage dtype), for block-wise reading."""
        return self.root[self._split(split)]["activations"]

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    def n_rows(self, split: str) -> int:
        return self.dataset(split).shape[0]

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        return split

    def column(self, split: str, name: str) -> np.ndarray:
        """A whole per-row field: token_ids, doc_ids, positions, norms or outlier."""
        try:
            return self.root[self._split(split)][name][:]
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read {split}/{name} ({exc}); the activation cache is damaged, "
                            "rerun `saepipe activations`") from None

    def mean(self, split: str = "train") -> np.ndarray:
        return self.root[self._split(split)]["mean"][:]

    def split_attrs(self, split: str) -> dict[str, Any]:
        return {k: plain(v) for k, v in self.root[self._split(split)].attrs.items()}

    def read_stored(self, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as stored; a damaged file is a one-line error naming it."""
        try:
            return self.dataset(split)[start:stop]
        except (OSError, KeyError) as exc:
            raise UserError(f"{self.path}: cannot read {split} rows {start}:{stop} ({exc}); the activation cache is "
                            "damaged, rerun `saepipe activations`") from None

    def read(self, split: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as float32."""
        return from_storage(self.read_stored(split, start, stop), self.storage_dtype)

    def iter_batches(self, split: str, batch_rows: int, include_outliers: bool = False
                     ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """(float32 rows, their row indices) in file order, outliers left out unless asked for."""
        keep = ~self.column(split, "outlier") if not include_outliers else None
        for start in range(0, self.n_rows(split), batch_rows):
            stop = min(start + batch_rows, self.n_rows(split))
            rows = self.read(split, start, stop)
            index = np.arange(start, stop)
            if keep is not None:
                mask = keep[start:stop]
                rows, index = rows[torch.from_numpy(mask)], index[mask]
            yield rows, index


def check_shards(path: Path, group: h5py.Group, splits: tuple[str, ...]) -> None:
    """Every shard the manifest names is there with the rows it recorded (a missing source file would
    read as zeros)."""
    files = [Path(path).parent / name for name in group.attrs["shard_files"]]
    for index, file in enumerate(files):
        if not file.is_file():
            raise UserError(f"{path}: its shard {file} is missing; rerun `saepipe activations`")
        try:
            with h5py.File(file, "r") as shard:
                rows = [shard[split]["activations"].shape[0] for split in splits]
        except (OSError, KeyError) as exc:
            raise UserError(f"{path}: its shard {file} is not readable ({exc}); rerun `saepipe activations`") from None
        expected = [int(group.attrs[f"{split}_shard_rows"][index]) for split in splits]
        if rows != expected:
            raise UserError(f"{path}: its shard {file} holds {rows} rows, expected {expected}; "
                            "rerun `saepipe activations`")
