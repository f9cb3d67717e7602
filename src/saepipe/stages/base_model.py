"""`saepipe base-model`: materialise the base model once as a local HF directory, so later stages run offline.

The route (gguf, hub or local) comes from `base_model.source`; the directory is built under a temporary
name and renamed into place only when complete, so an interrupted run leaves nothing that looks done.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from saepipe.config import Params
from saepipe.model import materialize
from saepipe.storage import atomic_dir, dir_size_bytes


def _step(message: str) -> None:
    print(f"base-model: {message} ...", file=sys.stderr, flush=True)


def _fill(params: Params, out: Path, workdir: Path) -> dict[str, Any]:
    cfg = params.base_model
    if cfg.source == "gguf":
        provenance = materialize.materialize_gguf(cfg, out, workdir, _step)
    elif cfg.source == "hub":
        provenance = materialize.materialize_hub(cfg, out, _step)
    else:
        provenance = materialize.materialize_local(cfg, out, _step)
    _step("validating and recording " + materialize.METADATA_FILE)
    return materialize.finalize(out, cfg, provenance)


def summary_line(record: dict[str, Any], output_dir: str, seconds: float, size_bytes: int) -> str:
    return (f"base-model: {record['model_name']} ({record['source']}, {record['model_type']}, "
            f"{record['n_layers']} layers, d_model {record['d_model']}, {record['n_params'] / 1e6:.1f}M params)"
            f" -> {output_dir} [{seconds:.0f} s, {size_bytes / 2**20:.0f} MiB]")


def run(params: Params) -> None:
    start = time.monotonic()
    output_dir = params.base_model.output_dir
    with atomic_dir(output_dir) as out, tempfile.TemporaryDirectory(prefix="saepipe-base-model-") as work:
        record = _fill(params, out, Path(work))
    print(summary_line(record, output_dir, time.monotonic() - start, dir_size_bytes(output_dir)), flush=True)
