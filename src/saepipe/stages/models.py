"""`saepipe models`: one SAE per model of a list (pipelines/models/), through the single pipeline's stages.

Three uses: `--configure KEY` writes model KEY's params file (the models pipeline's configure stage runs it);
`--list` shows each model's source, layer and memory settings; otherwise it runs `dvc repro` on the models
named by `--select` (all by default), the same as `cd pipelines/models && dvc repro report@KEY`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

from saepipe import many_models
from saepipe.config import layered_params
from saepipe.errors import UserError
from saepipe.storage import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-file", default=many_models.MODELS_FILE, metavar="FILE",
                        help=f"the list of models and their settings (default: {many_models.MODELS_FILE})")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true",
                        help="print each model's source, hook layer and memory settings, and run nothing")
    action.add_argument("--configure", metavar="KEY",
                        help="write model KEY's complete params file (what its DVC stages read) and exit")
    parser.add_argument("--select", metavar="KEYS",
                        help="comma-separated model keys to reproduce or list, e.g. qwen3-0.6b,qwen3-1.7b "
                        "(default: every model in the file)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc repro command instead of running it")


def configure(spec: many_models.ModelsFile, key: str, project_params: str) -> None:
    if len(many_models.select(spec, key, "--configure")) != 1:
        raise UserError("--configure: expected one model key")
    params = many_models.model_params(spec, key, layered_params(project_params))
    target = spec.params_file(key)
    with atomic_path(target) as tmp:
        tmp.write_text(many_models.params_text(params, key, spec), encoding="utf-8")
    print(f"models: {key}: {params.base_model.model_name} ({params.base_model.source}) -> {target}; "
          f"outputs under {spec.output_dir(key)}/")


def describe(spec: many_models.ModelsFile, keys: list[str], project_params: str) -> None:
    project = layered_params(project_params)
    print(f"{'model':<16} {'source':<32} {'layer':<7} {'batch':>5} {'context':>7} {'dtype':<9} outputs")
    for key in keys:
        params = many_models.model_params(spec, key, project)
        act, base = params.activations, params.base_model
        source = f"{base.source}:{base.model_name}" + (f"@{base.revision}" if base.revision else "")
        layer = "middle" if act.hook_layer is None else str(act.hook_layer)
        print(f"{key:<16} {source:<32} {layer:<7} {act.activation_batch_size:>5} {act.max_text_length:>7} "
              f"{act.forward_dtype:<9} {spec.output_dir(key)}/")


def reproduce(spec: many_models.ModelsFile, keys: list[str], dry_run: bool) -> None:
    command = ["dvc", "repro", *many_models.repro_targets(keys)]
    print(f"models: cd {spec.pipeline_dir} && " + " ".join(command), flush=True)
    if dry_run:
        return
    dvc = shutil.which("dvc")
    if dvc is None:
        raise UserError("dvc is not on PATH (install the project with `make install`)")
    start = time.monotonic()
    result = subprocess.run([dvc, *command[1:]], cwd=spec.pipeline_dir, check=False)
    if result.returncode != 0:
        raise UserError(f"dvc repro failed (exit code {result.returncode}) for {', '.join(keys)}")
    print(f"models: {len(keys)} model(s) up to date: {', '.join(keys)} -> {spec.output_dir('<model>')}/ "
          f"[{time.monotonic() - start:.0f} s]")


def run(args: argparse.Namespace) -> None:
    spec = many_models.read_models_file(args.models_file)
    if args.configure is not None:
        if args.select is not None:
            raise UserError("--configure writes one model's params; it takes no --select")
        configure(spec, args.configure, args.params)
        return
    keys = many_models.select(spec, args.select)
    if args.list:
        describe(spec, keys, args.params)
    else:
        reproduce(spec, keys, args.dry_run)
