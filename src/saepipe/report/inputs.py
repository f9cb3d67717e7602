"""What the report reads: the files the earlier stages wrote, found from params and checked up front.

Nothing is recomputed: the training history and config come from the export, the figures from evaluate's
`quick/` and the matrices stage's metrics, the per-feature records from `feature_summaries.jsonl`. A missing
input stops the stage with one line that names the file and the stage that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saepipe import paths
from saepipe.config import Params
from saepipe.corpus.labels import UNKNOWN, load_labels
from saepipe.corpus.tokens import read_token_cache
from saepipe.errors import UserError
from saepipe.storage import iter_jsonl, open_npy, read_json, read_npz, require_file


@dataclass(frozen=True)
class RunFiles:
    """Where a run's inputs to the report live."""

    sae: Path
    analysis: Path
    activation_db: Path
    matrices: Path
    summaries: Path

    @classmethod
    def of(cls, params: Params) -> RunFiles:
        analysis = paths.analysis_dir(params)
        return cls(sae=paths.evaluated_sae(params), analysis=analysis, activation_db=paths.activation_db(params),
                   matrices=paths.matrices_dir(params), summaries=paths.summaries_file(params))

    @property
    def quick(self) -> Path:
        return self.analysis / paths.QUICK

    @property
    def interp(self) -> Path:
        """`saepipe interp`'s folder: optional for the report (absent when that stage has not run)."""
        return self.analysis / paths.INTERP

    def required(self) -> dict[Path, str]:
        """Every file the report cannot do without, with the stage that writes it."""
        return {
            self.sae / paths.EXPORT_CONFIG: "export", self.sae / paths.EXPORT_HISTORY: "export",
            self.quick / paths.QUICK_METRICS: "evaluate", self.quick / paths.QUICK_DEAD: "evaluate",
            self.quick / paths.QUICK_HISTOGRAM: "evaluate", self.activation_db: "activation-db",
            self.analysis / paths.MATRICES_METRICS: "matrices",
            self.analysis / paths.SIMILARITY_HISTOGRAM: "matrices",
            self.matrices / paths.SIMILARITY_TOPK: "matrices",
            self.matrices / paths.COOCCURRENCE_TOPK: "matrices",
            self.summaries: "summarize",
        }

    def check(self) -> None:
        """Every required file present, and the matrices stage's arrays readable, before any work."""
        for path, stage in self.required().items():
            require_file(path, "report input", f"run `saepipe {stage}` first")
        for name, keys in TOPK_KEYS.items():
            read_npz(self.matrices / name, keys, "matrices")
        for name in (paths.SIMILARITY, paths.JACCARD):  # the dense matrices, when the stage wrote them
            if (self.matrices / name).is_file():
                open_npy(self.matrices / name, "matrices")


TOPK_KEYS = {paths.SIMILARITY_TOPK: ("values",), paths.COOCCURRENCE_TOPK: ("ids", "jaccard", "fire_counts")}
"""What the report reads of each top-k file of the matrices stage."""


@dataclass(frozen=True)
class RunInputs:
    """The small inputs, read whole: the export's record and history, and the stages' figures."""

    config: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    dead: dict[str, Any]
    density_histogram: list[dict[str, Any]]
    matrices_metrics: dict[str, Any]
    similarity_histogram: list[dict[str, Any]]
    probing: dict[str, Any] | None
    """`saepipe interp`'s probing.json and autointerp.json, when that stage has run."""
    autointerp: dict[str, Any] | None

    @classmethod
    def read(cls, files: RunFiles) -> RunInputs:
        files.check()
        history = read_json(files.sae / paths.EXPORT_HISTORY, "training history", "export", list, ("epoch",))
        if not history:
            raise UserError(f"{files.sae / paths.EXPORT_HISTORY}: expected a non-empty list of per-epoch records; "
                            "rerun `saepipe export`")
        return cls(config=read_json(files.sae / paths.EXPORT_CONFIG, "exported SAE config", "export", dict,
                                    ("sae_type", "d_sae", "model_name", "hook")),
                   history=history,
                   metrics=read_json(files.quick / paths.QUICK_METRICS, "evaluate metrics", "evaluate", dict,
                                     ("sparsity", "evaluated")),
                   dead=read_json(files.quick / paths.QUICK_DEAD, "dead features", "evaluate", dict, ("count",)),
                   density_histogram=read_json(files.quick / paths.QUICK_HISTOGRAM, "density histogram",
                                               "evaluate", list, ("bin_low", "bin_high", "features")),
                   matrices_metrics=read_json(files.analysis / paths.MATRICES_METRICS, "matrices metrics",
                                              "matrices", dict),
                   similarity_histogram=read_json(files.analysis / paths.SIMILARITY_HISTOGRAM, "similarity histogram",
                                                  "matrices", list, ("max_cosine", "features")),
                   probing=read_probing(files.interp),
                   autointerp=_optional_json(files.interp / paths.AUTOINTERP, "interp auto-interpretation"))


def read_probing(folder: Path) -> dict[str, Any] | None:
    """interp's probing figures: probing.json (the metrics) with the intervals and reasons probing_features.json
    keeps beside them (under "figures"); None when interp has not run."""
    probing = _optional_json(folder / paths.PROBING, "interp probing")
    details = _optional_json(folder / paths.PROBING_FEATURES, "interp probing details") if probing else None
    if probing is not None and isinstance(details, dict) and isinstance(details.get("figures"), dict):
        probing = {**details["figures"], **probing}
    return probing


def _optional_json(path: Path, what: str) -> Any:
    return read_json(path, what, "interp", dict) if path.is_file() else None


def read_explanations(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """`saepipe interp`'s explanations.jsonl by feature id: (the LLM's explanations and scores, without the
    windows it judged; the token baseline's explanation, scores and rarity); ({}, {}) when absent."""
    llm_keys = ("explanation", "detection", "fuzzing", "detection_auc", "fuzzing_auc", "baseline_detection",
                "baseline_fuzzing")
    baseline_keys = ("explanation", "detection", "fuzzing", "rarity", "score")
    llm: dict[int, dict[str, Any]] = {}
    baseline: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return llm, baseline
    for number, record in iter_jsonl(path, "interp"):
        try:
            f = int(record["id"])
            if record.get("llm"):
                llm[f] = {key: record["llm"].get(key) for key in llm_keys}
            if record.get("token_baseline"):
                baseline[f] = {key: record["token_baseline"][key] for key in baseline_keys}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}:{number}: not an explanation record ({exc}); rerun `saepipe interp`") from None
    return llm, baseline


def read_summaries(path: Path, examples: int) -> list[dict[str, Any]]:
    """Each feature's record from feature_summaries.jsonl, slimmed to what the report shows (stats, top
    tokens, the first `examples` top examples): the file holds every example and runs to tens of MB."""
    keep = ("id", "alive", "count", "density", "mean", "max", "top_tokens")
    records = []
    for number, summary in iter_jsonl(path, "summarize"):
        try:
            record = {key: summary[key] for key in keep}
            record["top_examples"] = summary["top_examples"][:examples]
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}:{number}: not a feature summary (no {exc}); rerun `saepipe summarize`") from None
        records.append(record)
    if not records or [r["id"] for r in records] != list(range(len(records))):
        raise UserError(f"{path}: expected one line per feature in id order; rerun `saepipe summarize`")
    return records


def document_name(label: dict[str, str]) -> str | None:
    """A document's subject and chapter as an example's source reads: the chapter alone where it begins with
    the subject (`physics_ch01_measurement-and-units`), else both; None where process had no labels."""
    subject, chapter = (label[key] for key in ("subject", "chapter"))
    known = [value for value in (subject, chapter) if value != UNKNOWN]
    if len(known) == 2 and chapter.startswith(subject):
        return chapter
    return " / ".join(known) or None


def document_names(labels: Path, token_cache: Path) -> list[str | None]:
    """Each document's name (`document_name`), by document id; [] without a labels file (texts.json written
    without `saepipe process`): the examples then show their document id and position only."""
    if not labels.is_file():
        return []
    return [document_name(label) for label in load_labels(labels, read_token_cache(token_cache).n_documents)]
