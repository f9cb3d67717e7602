"""A training run's name when `train.run_name` is null: derived from what the SAE is trained on.

`saepipe.paths` computes every per-run path from a name it is given; the stages that use per-run paths fill a
null name in first (`@names_run`), from the activation cache's model and hook and the `train` knobs, so that
`paths` stays below the cache and the SAE code.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from typing import Any

from saepipe.config import Params
from saepipe.errors import UserError, field_error
from saepipe.model.hooks import HookSpec
from saepipe.paths import activation_cache


def derived_run_name(params: Params) -> str:
    """`<model>.L<layer>.<hook>.<sae_type>.x<expansion>.k<topk>` (`.s<sparsity_penalty>` instead of `.k` for
    architectures without k), e.g. `smollm2-135m-instruct.L15.resid_post.batch_topk.x8.k32`.

    Model, layer and hook come from the activation cache's attributes (what the SAE is trained on, the middle
    layer resolved), the rest from `train`: two runs that differ in any of them get different folders.
    """
    from saepipe.activations.cache import ActivationCache  # torch: only when a name must be derived
    from saepipe.sae import config_class

    path = activation_cache(params)
    if not path.is_file():
        raise UserError(f"train.run_name is null and {path} does not exist to name the run from; "
                        "run `saepipe activations` first or set train.run_name")
    with ActivationCache(path) as cache:
        attrs = cache.attrs
    sae = params.train.sae
    model = re.sub(r"[^a-z0-9._-]+", "-", str(attrs["model_name"]).rstrip("/").rsplit("/", 1)[-1].lower())
    hook = HookSpec.parse(attrs["hook"])
    uses_k = "k" in {f.name for f in dataclasses.fields(config_class(sae.sae_type))}
    sparsity = f"k{sae.topk}" if uses_k else f"s{params.train.sparsity_penalty:g}"
    model = model.lstrip(".") or "model"
    return f"{model}.L{hook.layer}.{hook.name.removeprefix('hook_')}.{sae.sae_type}.x{sae.sae_expansion}.{sparsity}"


def with_run_name(params: Params) -> Params:
    """`params` with `train.run_name` filled in (derived when null).

    Inside a DVC stage (DVC sets DVC_STAGE) null is refused: dvc.yaml interpolates `${train.run_name}` into its
    paths and cannot compute a name, so the stage would write where DVC does not look.
    """
    if params.train.run_name is not None:
        return params
    if os.environ.get("DVC_STAGE"):
        raise field_error("train.run_name", None, "a name inside a DVC stage (dvc.yaml interpolates it into its "
                          "paths); null derives one only for ad-hoc `saepipe` runs")
    return dataclasses.replace(params, train=dataclasses.replace(params.train, run_name=derived_run_name(params)))


def names_run(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's `run(params, ...)` that uses per-run paths: it gets params with the run named."""

    @functools.wraps(run)
    def named(params: Params, *args: Any) -> Any:
        return run(with_run_name(params), *args)

    return named
