"""Auto-interpretation: explain a feature from its examples, then score the explanation (delphi's way).

Explanation (Bills et al., 2023; delphi): the model sees the feature's top-activating windows and windows
from lower quantile bands, each activating token marked `<<token>>` (a run of consecutive activating
tokens is one mark), and writes one sentence saying what the feature detects.

Scoring (Paulo et al., 2024, "Automatically Interpreting Millions of Features in LLMs"; EleutherAI delphi's
classifier scorers, one example per prompt):
- detection: held-out activating windows (not among the examples the explanation saw, drawn across the
  feature's activation range) mixed with random windows where the feature never fires, shown unmarked;
  for each, the model says whether the explanation's concept is present. Score: balanced accuracy.
- fuzzing: the same held-out activating windows with their activating tokens marked (correct), and the
  non-activating windows marked at positions taken from an activating window (incorrect, delphi's default
  fuzzing); for each, the model says whether the marked tokens are the ones the explanation describes.
  Score: balanced accuracy.
Balanced accuracy = (true-positive rate + true-negative rate) / 2: 0.5 for a model that always says the
same thing or guesses, 1 for a perfect explanation and judge. A window counts as judged "Yes" when
P(Yes) > P(No) for the answer token. Beside each, the AUROC of P(Yes) (`detection_auc`, `fuzzing_auc`):
threshold-free, so it still ranks windows when a small judge leans to one answer for all of them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from saepipe.analysis.activation_db import Example
from saepipe.analysis.explainer import Chat, Explainer

OPEN, CLOSE = "<<", ">>"
TOKEN_JUDGE = "token rule"
"""The name of the rule judge that scores the token baseline (in autointerp.json and the report)."""

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying one neuron of a language model. You will see text excerpts "
    "where the neuron activates; the tokens it activates on are marked like <<this>>. Say in one short "
    "sentence what the marked tokens have in common (a word, a concept, a pattern). Answer with the sentence only."
)
DETECTION_SYSTEM = (
    "You are checking an explanation of a language-model neuron. Given the explanation and one text excerpt, "
    "answer Yes if the excerpt contains what the explanation describes, otherwise No. Answer with one word."
)
FUZZING_SYSTEM = (
    "You are checking an explanation of a language-model neuron. In the text excerpt some tokens are marked like "
    "<<this>>. Answer Yes if the marked tokens are exactly what the explanation describes, otherwise No. Answer "
    "with one word."
)


def mark(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The tokens joined, each run of consecutive marked tokens wrapped in << >>."""
    out, open_run = [], False
    for token, on in zip(tokens, marked, strict=True):
        if on and not open_run:
            out.append(OPEN)
        elif not on and open_run:
            out.append(CLOSE)
        out.append(token)
        open_run = on
    if open_run:
        out.append(CLOSE)
    return "".join(out)


def mark_activating(example: Example) -> str:
    return mark(example.tokens, [a > 0 for a in example.activations])


def explanation_prompt(examples: Sequence[Example]) -> Chat:
    body = "\n".join(f"Example {i + 1}: {mark_activating(e)}" for i, e in enumerate(examples))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"{body}\n\nWhat do the marked tokens have in common?"}]


def detection_prompt(explanation: str, text: str) -> Chat:
    return [{"role": "system", "content": DETECTION_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpt: {text}\n\n"
                                        "Does the excerpt contain what the explanation describes? Yes or No?"}]


def fuzzing_prompt(explanation: str, marked_text: str) -> Chat:
    return [{"role": "system", "content": FUZZING_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpt: {marked_text}\n\n"
                                        "Are the marked tokens what the explanation describes? Yes or No?"}]


def clean_explanation(text: str) -> str:
    """A generated answer kept whole (a model that starts with a heading goes on to say what it means), on one
    line, without a leading label or surrounding quotes."""
    line = " ".join(text.split())
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", line, flags=re.I).strip()
    return line[1:-1].strip() if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'" else line


def balanced_accuracy(truth: Sequence[bool], p_yes: Sequence[float]) -> float:
    """(true-positive rate + true-negative rate) / 2 of the answers P(Yes) > 0.5 (scikit-learn's definition,
    in numpy: the token baseline scores thousands of features, and sklearn's input checks cost a millisecond)."""
    truth, said = np.asarray(truth, bool), np.asarray(p_yes) > 0.5
    return float((said[truth].mean() + (~said[~truth]).mean()) / 2)


def auroc(truth: Sequence[bool], p_yes: Sequence[float]) -> float:
    """Area under the ROC curve of P(Yes): threshold-free, so a judge biased towards one answer still shows
    whatever ranking it has (delphi computes it from the answers' log-probabilities too). The Mann-Whitney
    form, over every (activating, non-activating) pair: P(higher P(Yes) for the activating one), ties half."""
    truth, p = np.asarray(truth, bool), np.asarray(p_yes, np.float64)
    pos, neg = p[truth][:, None], p[~truth][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


@dataclass(frozen=True)
class FeatureExamples:
    """What the explainer and the scorers see of one feature."""

    feature: int
    explain: list[Example]
    """Top and quantile-band examples the explanation is written from."""
    activating: list[Example]
    """Held-out activating windows (never shown to the explainer)."""
    non_activating: list[Example]
    """Windows where the feature does not fire on any token."""


@dataclass(frozen=True)
class Explanation:
    text: str
    tokens: tuple[str, ...] = ()
    """The tokens a rule judge looks for (the token baseline's explanation); empty for a written one."""


@dataclass(frozen=True)
class Window:
    """One excerpt a judge sees: unmarked (detection) or with some tokens marked (fuzzing)."""

    tokens: list[str]
    marked: list[bool] | None
    truth: bool
    """Activating (detection) or correctly marked (fuzzing)."""

    def text(self) -> str:
        return "".join(self.tokens) if self.marked is None else mark(self.tokens, self.marked)


def detection_windows(examples: FeatureExamples) -> list[Window]:
    return [Window(e.tokens, None, True) for e in examples.activating] + \
        [Window(e.tokens, None, False) for e in examples.non_activating]


def fuzzing_windows(examples: FeatureExamples, rng: random.Random) -> list[Window]:
    """Activating windows marked where the feature fires (correct); non-activating windows marked at the
    positions of a randomly chosen activating window (incorrect: delphi's default fuzzing)."""
    patterns = [[a > 0 for a in e.activations] for e in examples.activating]
    windows = [Window(e.tokens, p, True) for e, p in zip(examples.activating, patterns, strict=True)]
    for e in examples.non_activating:
        pattern = rng.choice(patterns)
        marked = [pattern[i] if i < len(pattern) else False for i in range(len(e.tokens))]
        if not any(marked):  # the borrowed marks fall past this window's end: mark its own last token
            marked[-1] = True
        windows.append(Window(e.tokens, marked, False))
    return windows


class Judge(Protocol):
    name: str

    def p_yes(self, explanation: Explanation, windows: list[Window], task: str) -> np.ndarray:
        """P(Yes) for each window; `task` is "detection" or "fuzzing"."""
        ...


class ModelJudge:
    """The explainer model asked one Yes/No question per window."""

    def __init__(self, explainer: Explainer):
        self.explainer, self.name = explainer, explainer.name

    def p_yes(self, explanation: Explanation, windows: list[Window], task: str) -> np.ndarray:
        prompt = detection_prompt if task == "detection" else fuzzing_prompt
        return self.explainer.yes_probability([prompt(explanation.text, w.text()) for w in windows])


class TokenJudge:
    """The rule judge of the token baseline: Yes when the excerpt holds one of the explanation's tokens
    (detection), or when a marked token is one of them (fuzzing). Needs no model, so every feature is scored."""

    name = TOKEN_JUDGE

    def p_yes(self, explanation: Explanation, windows: list[Window], task: str) -> np.ndarray:
        words = set(explanation.tokens)
        return np.array([float(any(t in words for t, on in zip(w.tokens, w.marked or [True] * len(w.tokens),
                                                                strict=True) if on)) for w in windows])


def score_feature(judge: Judge, explanation: Explanation, examples: FeatureExamples, seed: int,
                  keep_windows: bool = True) -> dict[str, Any]:
    """Detection and fuzzing balanced accuracies (and AUROCs) of one explanation, with every judged window."""
    out: dict[str, Any] = {}
    for task, windows in (("detection", detection_windows(examples)),
                          ("fuzzing", fuzzing_windows(examples, random.Random(seed)))):
        truth = [w.truth for w in windows]
        p = judge.p_yes(explanation, windows, task)
        out[task] = round(balanced_accuracy(truth, p), 4)
        out[f"{task}_auc"] = round(auroc(truth, p), 4)
        if keep_windows:
            key = "activating" if task == "detection" else "correct"
            out[f"{task}_examples"] = [{"text": w.text(), key: w.truth, "p_yes": round(float(q), 4)}
                                       for w, q in zip(windows, p, strict=True)]
    return out


def explain(explainer: Explainer, features: Sequence[FeatureExamples], max_new_tokens: int) -> list[str]:
    """One explanation per feature (prompts batched by the explainer)."""
    texts = explainer.generate([explanation_prompt(f.explain) for f in features], max_new_tokens)
    return [clean_explanation(t) for t in texts]


def interpret(explainer: Explainer, features: Sequence[FeatureExamples], max_new_tokens: int, seed: int,
              baselines: Sequence[Explanation] | None = None, progress: Any = None, chunk: int = 8
              ) -> list[dict[str, Any]]:
    """Explain and score the features `chunk` at a time (one generation batch, then each one's scoring
    prompts): one record per feature, explanations.jsonl's lines. With `baselines` (the token baseline's
    explanation of each feature), each record also holds that baseline's scores on the very same windows."""
    judge = ModelJudge(explainer)
    records = []
    for start in range(0, len(features), chunk):
        part = features[start : start + chunk]
        for i, (f, text) in enumerate(zip(part, explain(explainer, part, max_new_tokens), strict=True)):
            scores = score_feature(judge, Explanation(text), f, seed + f.feature)
            record = {"id": f.feature, "explanation": text,
                      **{k: scores[k] for k in ("detection", "fuzzing", "detection_auc", "fuzzing_auc")}}
            if baselines is not None:
                baseline = baselines[start + i]
                paired = score_feature(TokenJudge(), baseline, f, seed + f.feature, keep_windows=False)
                record.update({"baseline_explanation": baseline.text,
                               **{f"baseline_{k}": v for k, v in paired.items()}})
            record["examples"] = {"explanation": [mark_activating(e) for e in f.explain],
                                  "detection": scores["detection_examples"], "fuzzing": scores["fuzzing_examples"]}
            records.append(record)
            if progress is not None:
                progress.update(1)
    return records


def eligible_features(counts: np.ndarray, shown: int, score_examples: int) -> np.ndarray:
    """Features with enough activating tokens to show `shown` and still hold out `score_examples`."""
    return np.flatnonzero(counts >= shown + score_examples)


def sample_features(counts: np.ndarray, n: int, shown: int, score_examples: int, seed: int) -> list[int]:
    """A seeded sample of `n` eligible features, in id order."""
    eligible = eligible_features(counts, shown, score_examples)
    chosen = np.random.default_rng(seed).choice(eligible, size=min(n, len(eligible)), replace=False)
    return sorted(int(f) for f in chosen)


def held_out_rows(db: Any, f: int, shown: set[tuple[int, int]], skip: int, n: int, rng: np.random.Generator
                  ) -> list[int]:
    """`n` activating rows ranked after the `skip` top ones and not among the `shown` (doc, position)s, one from
    each of n equal bands of the remaining activation range (so the scorers see weak activations as well)."""
    rows, _ = db.feature_rows(f, skip)
    rows = [int(r) for r in rows if (int(db.row_doc[r]), int(db.row_position[r])) not in shown]
    if len(rows) <= n:
        return rows
    return [rows[int(rng.choice(band))] for band in np.array_split(np.arange(len(rows)), n)]


def non_activating_examples(db: Any, f: int, n: int, context: tuple[int, int], rng: np.random.Generator,
                            attempts: int = 50) -> list[Example]:
    """Up to `n` windows, around random non-outlier rows, on none of whose tokens `f` fires."""
    candidates = np.flatnonzero(~db.row_outlier)
    out: list[Example] = []
    for row in rng.choice(candidates, size=min(len(candidates), n + attempts), replace=False).tolist():
        example = db.examples(f, np.array([row]), context)[0]
        if not any(example.activations):
            out.append(example)
            if len(out) == n:
                break
    return out


def feature_examples(db: Any, summary: dict[str, Any], explain_examples: int, score_examples: int,
                     context: tuple[int, int], seed: int) -> FeatureExamples:
    """The explanation's examples from a feature's summary line; the scorers' windows from the DB."""
    f = int(summary["id"])
    top = [Example(**e) for e in summary["top_examples"]]
    bands = [Example(**e) for examples in summary["quantile_examples"].values() for e in examples]
    shown = {(e.doc, e.position) for e in top + bands}
    rng = np.random.default_rng([seed, f])
    rows = held_out_rows(db, f, shown, len(top), score_examples, rng)
    activating = db.examples(f, np.array(rows, dtype=np.int64), context) if rows else []
    non_activating = non_activating_examples(db, f, len(activating), context, rng)
    return FeatureExamples(f, top[:explain_examples] + bands, activating, non_activating)
