"""Stage `evaluate`: an exported SAE + the activation cache (+ the model and token cache) -> the quick analysis.

Writes `<evaluate.output_dir>/<SAE folder>/quick/` in one piece (a temporary directory renamed when complete):

    headline.json            the five figures runs are compared by, flat (DVC metrics: `dvc exp show` columns)
    metrics.json             every figure, the formulas, and what was evaluated
    feature_density.npy      float64 [d_sae]: fraction of evaluated tokens each feature fires on
    dead_features.json       {"count", "ids"}: features that never fire on the evaluated tokens
    density_histogram.json   log10-density histogram of alive features (a DVC plot: x log10_density, y features)
    density_histogram.png    the same as a bar chart
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saepipe.activations.cache import ActivationCache, sae_hook
from saepipe.activations.run_name import names_run
from saepipe.analysis import ablation, reconstruction, sparsity
from saepipe.analysis.quick import ActivationEvaluation, cache_batches, evaluate_activations
from saepipe.analysis.sparsity import DensityHistogram, log10_density_histogram
from saepipe.config import Params
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError
from saepipe.model.hooks import HookSpec
from saepipe.model.loading import load_hooked_model, resolve_device
from saepipe.paths import (
    QUICK_DEAD,
    QUICK_DENSITY,
    QUICK_HEADLINE,
    QUICK_HISTOGRAM,
    QUICK_HISTOGRAM_PNG,
    QUICK_METRICS,
    activation_cache,
    evaluated_sae,
    quick_dir,
)
from saepipe.sae import SparseAutoencoder
from saepipe.sae.formats import check_compatible, load_sae
from saepipe.storage import atomic_dir, write_json
from saepipe.text import count

FORMULAS = {
    **reconstruction.FORMULAS,
    "l0": "number of features with activation > 0 on a token; mean, median and p90 over evaluated tokens",
    "density": "fraction of evaluated tokens on which a feature's activation is > 0",
    "dead_features": "features with density 0 on the evaluated tokens",
    "outliers": "rows the activation cache flagged (norm > outlier_factor x median norm) are left out of the "
                "main figures unless evaluate.include_outliers; fvu_with_outliers counts them",
    **{f"ablation_{k}": v for k, v in ablation.FORMULAS.items()},
}


def output_dir(params: Params) -> Path:
    return quick_dir(params)


def load_model(params: Params, attrs: dict[str, Any], sae: SparseAutoencoder, device: torch.device) -> Any:
    """The base model, checked against the SAE and the cache: the hook must exist and d_model match."""
    model = load_hooked_model(params.base_model.output_dir, device=device, dtype=attrs["forward_dtype"])
    hook = attrs["hook"]
    if hook not in model.hook_dict:
        raise UserError(f"the model in {params.base_model.output_dir} has no hook {hook} "
                        f"({model.cfg.n_layers} layers); it is not the model the activation cache was made with")
    check_compatible(sae, d_model=int(model.cfg.d_model), model_name=params.base_model.model_name,
                     against=f"the model in {params.base_model.output_dir}")
    return model


@names_run
def run(params: Params) -> None:
    cfg = params.evaluate
    started = time.perf_counter()
    device = resolve_device(cfg.device, "evaluate.device")
    path = evaluated_sae(params)
    sae = load_sae(path, device)
    cache_path = activation_cache(params)
    with ActivationCache(cache_path, hook=sae_hook(sae), strict=False) as cache:
        attrs = cache.attrs
        check_compatible(sae, d_model=cache.d_model, hook=attrs["hook"], model_name=attrs["model_name"],
                         against=f"the activation cache {cache_path} holds {attrs['model_name']} {attrs['hook']}")
        if cache.n_rows(cfg.split) == 0:
            raise UserError(f"{cache_path} has no {cfg.split} rows to evaluate (evaluate.split={cfg.split!r})")
        run_ablation = cfg.ablation_max_tokens != 0
        model = token_cache = None
        if run_ablation:  # fail on a mismatch before any long pass
            token_cache = read_token_cache(params.tokenize.output, matching=attrs)
            model = load_model(params, attrs, sae, device)
        mean = cache.mean(cfg.split)
        # The documents of the rows evaluated below: the ablation scores these same documents, no others.
        documents = np.unique(cache.column(cfg.split, "doc_ids")[:cfg.max_tokens])

        act_started = time.perf_counter()
        try:
            activations = evaluate_activations(
                sae, cache_batches(cache, cfg.split, cfg.batch_size, cfg.max_tokens, progress=True),
                include_outliers=cfg.include_outliers)
        except ValueError as exc:
            raise UserError(f"{cache_path} ({cfg.split}): {exc}; set evaluate.include_outliers") from None
        act_seconds = time.perf_counter() - act_started

    figures: dict[str, Any] = {
        "evaluated": {"sae_path": str(path), "sae_type": sae.cfg.sae_type, "d_in": sae.d_in, "d_sae": sae.d_sae,
                      "model_name": attrs["model_name"], "hook": attrs["hook"], "split": cfg.split,
                      "activation_cache": str(cache_path), "documents": len(documents)},
        **activations.figures(),
    }
    timing: dict[str, float] = {"activation_tokens_per_second": activations.sparsity.tokens / act_seconds}
    if run_ablation:
        assert model is not None and token_cache is not None
        bos = bool(attrs["prepend_bos"])
        plan = ablation.ablation_plan(token_cache, cfg.split, max_text_length=int(attrs["max_text_length"]),
                                      prepend_bos=bos, overlap=int(attrs["context_overlap"]),
                                      max_tokens=cfg.ablation_max_tokens, documents=documents)
        if len(plan) == 0:
            raise UserError(f"{params.tokenize.output} has no {cfg.split} document long enough to score a prediction")
        abl_started = time.perf_counter()
        figures["ablation"] = ablation.evaluate_ablation(
            model, HookSpec.parse(attrs["hook"]), sae, token_cache, plan,
            bos_id=int(attrs["bos_token_id"]) if bos else None,
            token_budget=int(attrs.get("batch_token_budget", 8 * int(attrs["max_text_length"]))), mean=mean,
            on_estimate=lambda n, seconds: _print_hint(ablation_hint(n, seconds, cfg.ablation_max_tokens)))
        timing["ablation_tokens_per_second"] = figures["ablation"]["tokens"] / (time.perf_counter() - abl_started)
    timing["seconds"] = time.perf_counter() - started
    figures["timing"] = timing
    figures["formulas"] = FORMULAS

    out_dir = output_dir(params)
    histogram = log10_density_histogram(activations.sparsity.density, activations.sparsity.tokens)
    write_outputs(out_dir, figures, activations, histogram)
    print(summary(figures, out_dir))


HINT_SECONDS = 120.0
"""An ablation pass estimated to take longer than this gets a one-line hint about its size."""


def ablation_hint(predictions: int, seconds: float, max_tokens: int | None) -> str | None:
    """Where to shorten a long ablation pass: most of evaluate's time, paid again by every experiment."""
    if seconds < HINT_SECONDS:
        return None
    now = "null" if max_tokens is None else max_tokens
    return (f"evaluate: hint: the ablation pass scores {predictions:,} predictions, about {_duration(seconds)} at "
            f"the first batch's speed; lower evaluate.ablation_max_tokens (now {now}; 0 skips it) to shorten it")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _print_hint(line: str | None) -> None:
    if line is not None:
        tqdm.write(line, file=sys.stderr)


def headline(figures: dict[str, Any]) -> dict[str, float]:
    """The figures runs are compared by, one flat level so that `dvc exp show` gives each a short column:
    `fvu` (on the evaluated split, outliers left out), `l0` (mean), `dead_pct`, and with the ablation pass
    `ce_recovered` (CE loss recovered against zero ablation) and `kl` (KL(clean || SAE spliced in))."""
    sp, rc = figures["sparsity"], figures["reconstruction"]
    values = {"fvu": rc["fvu"], "l0": sp["l0_mean"], "dead_pct": sp["dead_feature_percentage"]}
    ab = figures.get("ablation")
    if ab:
        values.update(ce_recovered=ab["ce_loss_recovered"], kl=ab["kl_sae"])
    return {name: float(value) for name, value in values.items()}


def write_outputs(out_dir: Path, figures: dict[str, Any], activations: ActivationEvaluation,
                  histogram: DensityHistogram) -> None:
    result = activations.sparsity
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / QUICK_HEADLINE, headline(figures))
        write_json(tmp / QUICK_METRICS, figures)
        np.save(tmp / QUICK_DENSITY, result.density)
        write_json(tmp / QUICK_DEAD, {"count": len(result.dead_ids), "tokens": result.tokens,
                                 "ids": result.dead_ids.tolist()})
        write_json(tmp / QUICK_HISTOGRAM, histogram.rows())
        plot_histogram(histogram, result, figures["evaluated"], tmp / QUICK_HISTOGRAM_PNG)
        for file in tmp.iterdir():
            file.chmod(0o644)



def plot_histogram(histogram: DensityHistogram, result: sparsity.SparsityResult, evaluated: dict[str, Any],
                   path: Path) -> None:
    """A bar chart of the log10-density histogram (matplotlib's Agg canvas; no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    widths = np.diff(histogram.edges)
    ax.bar(histogram.edges[:-1], histogram.counts, width=widths, align="edge", edgecolor="white")
    ax.set_xlabel("log10(feature firing density)")
    ax.set_ylabel("features")
    ax.set_title(f"{evaluated['sae_type']} SAE on {evaluated['hook']}, {result.tokens:,} {evaluated['split']} "
                 f"tokens\n{histogram.dead} dead of {result.d_sae} (not shown)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _g(value: Any, spec: str = ".4g") -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def summary(figures: dict[str, Any], out_dir: Path) -> str:
    ev, sp, rc = figures["evaluated"], figures["sparsity"], figures["reconstruction"]
    outliers = rc["outlier_rows"]
    lines = [
        f"evaluate: {ev['sae_type']} SAE {ev['d_in']} -> {ev['d_sae']} on {ev['hook']}, {ev['split']} split",
        f"  tokens          {count(sp['tokens'], 'cached row')} of {count(ev['documents'], 'document')} "
        f"({count(outliers, 'outlier row')} "
        f"{'included' if rc['outliers_included'] else 'left out'})",
        f"  sparsity        L0 mean {_g(sp['l0_mean'])}, median {_g(sp['l0_median'])}, p90 {_g(sp['l0_p90'])}; "
        f"dead {sp['dead_features']} ({_g(sp['dead_feature_percentage'], '.2f')}%); firing on >1%: "
        f"{sp['features_firing_over_1pct']}, >10%: {sp['features_firing_over_10pct']}",
        f"  reconstruction  FVU {_g(rc['fvu'])} (explained {_g(rc['explained_variance'])}; with outliers "
        f"{_g(rc['fvu_with_outliers'])}), MSE {_g(rc['mse'])}, cos {_g(rc['cos_sim'])}, "
        f"L2 ratio {_g(rc['l2_ratio'])}, bias {_g(rc['relative_reconstruction_bias'])}",
    ]
    ab = figures.get("ablation")
    if ab:
        lines += [
            f"  ablation        {ab['tokens']:,} predictions in {ab['documents']:,} of those documents: "
            f"CE clean {_g(ab['ce_clean'])}, SAE {_g(ab['ce_sae'])}, "
            f"zero {_g(ab['ce_zero'])}, mean {_g(ab['ce_mean'])}",
            f"                  CE loss recovered {_g(ab['ce_loss_recovered'])} (vs mean "
            f"{_g(ab['ce_loss_recovered_vs_mean'])}); KL SAE {_g(ab['kl_sae'])}, zero {_g(ab['kl_zero'])}, "
            f"mean {_g(ab['kl_mean'])}",
            f"                  error term added back: CE {_g(ab['ce_sae_with_error'])}, "
            f"KL {_g(ab['kl_sae_with_error'])} (should be clean: {_g(ab['ce_clean'])}, 0)",
        ]
    lines.append(f"  -> {out_dir} [{figures['timing']['seconds']:.0f} s]")
    return "\n".join(lines)
