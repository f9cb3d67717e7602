"""`analysis/compare/`: compare.json, README.md and frontier.png for a set of runs; and a feature match between
two runs (its summary, and per feature where A's browser finds it)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.compare import table
from saepipe.compare.match import FeatureMatch
from saepipe.compare.plots import frontier
from saepipe.compare.runs import Run
from saepipe.storage import atomic_dir, atomic_path, write_json

COMPARE_JSON, README, FRONTIER, FRONTIER_DATA = "compare.json", "README.md", "frontier.png", "frontier.json"
MATCHES_JS = "index.js"
"""In `<analysis>/<A>/matches/`: what A's feature browser loads (`../../matches/index.js`) to show matches."""
COLUMNS = (("fvu", "FVU", 4), ("l0", "L0", 1), ("dead_pct", "dead %", 2), ("ce_recovered", "CE rec.", 3),
           ("kl", "KL", 3), ("subject_k1", "probe k1", 3),
           ("baseline_detection", "token detection", 3))
NOISE_METRICS = ("fvu", "ce_recovered", "kl")


def comparison(runs: Sequence[Run], noise_sds: float = table.NOISE_SDS) -> dict[str, Any]:
    """compare.json: one row per run (its differing params and figures), winners, seed groups, the noise rule."""
    names = [r.name for r in runs]
    params = [table.configuration(r.params) for r in runs]
    metrics = [r.metrics for r in runs]
    common = set.intersection(*(set(p) for p in params))
    differing = [k for k in table.differing_params(params) if k in common]
    groups = table.seed_groups(names, [{k: p[k] for k in common} for p in params], metrics)
    front = {key: {names[i] for i in table.pareto_front([m.get("l0") for m in metrics], [m.get(key) for m in metrics],
                                                          higher)}
             for key, higher in (("fvu", False), ("ce_recovered", True))}
    group_of = {name: g.label for g in groups for name in g.members}
    rows = [{"name": r.name, "source": r.source, "architecture": r.architecture,
             "params": {k: p.get(k) for k in differing}, "metrics": r.metrics, "group": group_of[r.name],
             "pareto_fvu": r.name in front["fvu"], "pareto_ce_recovered": r.name in front["ce_recovered"]}
            for r, p in zip(runs, params, strict=True)]
    noise = [{"a": a.label, "b": b.label, "metric": m, "difference": a.mean[m] - b.mean[m],
              "within_seed_noise": table.within_noise(a, b, m, noise_sds)}
             for i, a in enumerate(groups) for b in groups[i + 1:]
             for m in NOISE_METRICS if m in a.mean and m in b.mean]
    return {"runs": rows, "differing_params": differing, "winners": table.winners(names, metrics),
            "groups": [{"label": g.label, "config": g.config, "members": g.members, "mean": g.mean, "sd": g.sd}
                       for g in groups],
            "noise": noise,
            "noise_rule": f"runs that differ only in {table.SEED} form a group (mean and sample sd over its seeds); "
                          f"two groups differ within seed noise when |mean_a - mean_b| < {noise_sds:g} x the "
                          "larger sd (undecided, null, while either group has one seed)",
            "pareto_rule": "a run is on the front when no other run has L0 as low or lower and the figure as good or "
                           "better, one of them strictly"}


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def readme(result: dict[str, Any], title: str) -> str:
    differing = result["differing_params"]
    head = ["run", "source", "architecture", *[k.split(".")[-1] for k in differing], *[c[1] for c in COLUMNS]]
    lines = [f"# {title}", "", f"{len(result['runs'])} runs; the params that differ between them: "
             f"{', '.join(f'`{k}`' for k in differing) or 'none'}. Sorted by FVU; * marks the runs on the FVU-L0 "
             "Pareto front.", "", "![the frontier](frontier.png)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(result["runs"], key=lambda r: (r["metrics"].get("fvu") is None, r["metrics"].get("fvu") or 0))
    for r in rows:
        cells = [r["name"] + (" *" if r["pareto_fvu"] else ""), r["source"], r["architecture"],
                 *[_cell(r["params"].get(k), 4) for k in differing],
                 *[_cell(r["metrics"].get(key), digits) for key, _, digits in COLUMNS]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best per figure", ""]
    lines += [f"- {key}: **{name}**" for key, name in result["winners"].items()]
    multi = [g for g in result["groups"] if len(g["members"]) > 1]
    if multi:
        lines += ["", "## Seed noise", "", result["noise_rule"] + ".", "",
                  "| configuration | seeds | " + " | ".join(m for m in NOISE_METRICS) + " |",
                  "|---|---|" + "---|" * len(NOISE_METRICS)]
        for g in result["groups"]:
            cells = [f"{_cell(g['mean'].get(m), 4)} ± {_cell(g['sd'].get(m), 4)}" for m in NOISE_METRICS]
            lines.append(f"| {g['label']} | {len(g['members'])} | " + " | ".join(cells) + " |")
        lines += ["", "| a | b | figure | a - b | verdict |", "|---|---|---|---|---|"]
        for n in result["noise"]:
            verdict = {True: "within seed noise", False: "a real difference", None: "undecided (one seed)"}[
                n["within_seed_noise"]]
            lines.append(f"| {n['a']} | {n['b']} | {n['metric']} | {n['difference']:+.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: Sequence[Run], out_dir: Path, title: str, noise_sds: float = table.NOISE_SDS
                     ) -> dict[str, Any]:
    """The files, each written to a temporary name and renamed when complete (the plot first, the table that
    names it last)."""
    result = comparison(runs, noise_sds)
    with atomic_path(out_dir / FRONTIER) as tmp:
        frontier([r.name for r in runs], [r.architecture for r in runs], [r.metrics for r in runs], title, tmp)
    write_json(out_dir / FRONTIER_DATA, [{"run": r.name, "architecture": r.architecture,
                                          **{k: r.metrics.get(k) for k in ("l0", "fvu", "ce_recovered")}}
                                         for r in runs])  # the points, for `dvc plots` where compare is a stage
    write_json(out_dir / COMPARE_JSON, result)
    with atomic_path(out_dir / README) as tmp:
        tmp.write_text(readme(result, title), encoding="utf-8")
    return result


def match_summary(a: str, b: str, d_a: int, d_b: int, found: FeatureMatch, alive: np.ndarray,
                  correlation: np.ndarray | None, method: str) -> dict[str, Any]:
    summary = {"a": a, "b": b, "d_a": d_a, "d_b": d_b, "method": method, "alive_a": len(alive),
               "alive_from": "A's dead latents (evaluate)" if len(alive) < d_a else "every latent (none known dead)",
               "matched_0.9": found.share(0.9, alive), "matched_0.7": found.share(0.7, alive),
               "mean_cosine": float(found.cosine[alive].mean()) if len(alive) else math.nan,
               "split_latents": int(sum(len(s) > 1 for s in found.splits))}
    if correlation is not None:
        ok = np.isfinite(correlation[alive])
        summary["mean_correlation"] = float(correlation[alive][ok].mean()) if ok.any() else math.nan
    return summary


def feature_records(found: FeatureMatch, correlation: np.ndarray | None) -> list[dict[str, Any]]:
    return [{"id": i, "match": int(found.match[i]), "cosine": round(float(found.cosine[i]), 4),
             "best": int(found.best[i]), "best_cosine": round(float(found.best_cosine[i]), 4),
             "correlation": None if correlation is None or not np.isfinite(correlation[i])
             else round(float(correlation[i]), 4),
             "splits": [[j, round(c, 4)] for j, c in found.splits[i]]} for i in range(len(found.match))]


def write_match(out_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """`<out_dir>/summary.json` and `features.jsonl` (one line per A latent), written whole or not at all."""
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "summary.json", summary)
        (tmp / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out_dir


def write_browser_matches(matches_dir: Path, b: str, b_browser: str | None, summary: dict[str, Any],
                          records: list[dict[str, Any]]) -> Path:
    """Add run `b` to `<A's analysis>/matches/index.js`, the script A's feature browser loads: per A feature its
    match in B, the cosine, the correlation and the splits, linking to B's browser where it has one."""
    path = matches_dir / MATCHES_JS
    known: dict[str, Any] = {}
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        known = json.loads(text[text.index("{"):text.rindex("}") + 1])
    known[b] = {"browser": b_browser, "summary": summary,
                "features": {r["id"]: [r["match"], r["cosine"], r["correlation"], r["splits"][:8]] for r in records}}
    matches_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(f"SAEBrowser.receive(\"matches\", {json.dumps(known)});\n", encoding="utf-8")
    return path
