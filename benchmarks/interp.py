"""Speed of `interp`'s auto-interpretation against the bare model on the same inputs.

value    = detection prompts scored per second by `LocalExplainer.yes_probability` (chat rendering,
           tokenizing, the shared prefix's KV cache computed once per batch and reused, the answer's
           probabilities read at each prompt's last token)
baseline = prompts per second of a bare forward of the same model over the same prompts' full token
           sequences to one position's logits, in the same batches (right-padded, no prefix reuse), timed
           alternately in the same run
ratio    = value / baseline; goal >= 0.8 (batching and bookkeeping must not dominate)

Also reported: explanations generated per minute by `explain` (rendering, batched greedy `generate` with left
padding, decoding, cleaning) against a bare `model.generate` on the same tokenized batches
(`explain_ratio`, same goal). The features are a seeded sample of this run's, with the stage's own examples.

Needs `models/base`, the token cache, the activation DB and the feature summaries of the run (`dvc repro
summarize`); `--params` points elsewhere (e.g. a params file naming another checkout's outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.analysis.activation_db import ActivationDB  # noqa: E402
from saepipe.analysis.autointerp import (  # noqa: E402
    detection_prompt,
    explain,
    explanation_prompt,
    feature_examples,
    sample_features,
)
from saepipe.analysis.explainer import LocalExplainer  # noqa: E402
from saepipe.config import load_params  # noqa: E402
from saepipe.model.tokenizer import load_tokenizer  # noqa: E402
from saepipe.paths import SUMMARIES, activation_db, analysis_dir  # noqa: E402
from saepipe.stages.interp import read_summaries  # noqa: E402


def bare_forward(explainer: LocalExplainer, ids: list[list[int]]) -> None:
    """The whole sequences, right-padded, one forward to one position's logits: a bare scorer without the
    shared prefix (the vocabulary head on one position, as a plain `logits_to_keep=1` forward computes)."""
    width = max(map(len, ids))
    x = torch.full((len(ids), width), explainer.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for row, seq in enumerate(ids):
        x[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    with torch.inference_mode():
        explainer.model(input_ids=x.to(explainer.device), attention_mask=mask.to(explainer.device), use_cache=False,
                        logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--features", type=int, default=4, help="features explained (and whose prompts are scored)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed rounds of each side")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg, summarize = params.interp, params.summarize
    torch.manual_seed(0)
    explainer = LocalExplainer(params.base_model.output_dir, torch.device("cpu"), cfg.batch_size)
    tokenizer = load_tokenizer(params.base_model.output_dir)
    shown = summarize.top_k + len(summarize.quantile_bands) * summarize.quantile_examples
    with ActivationDB(activation_db(params), tokens=params.tokenize.output, tokenizer=tokenizer) as db:
        ids = sample_features(db.counts, args.features, shown, cfg.score_examples, cfg.seed)
        features = [feature_examples(db, s, cfg.explain_examples, cfg.score_examples,
                                     (summarize.context_before, summarize.context_after), cfg.seed)
                    for s in read_summaries(analysis_dir(params) / SUMMARIES, ids)]

    explanations = explain(explainer, features, cfg.max_new_tokens)  # warm-up, and the explanations scored below
    prompts = [detection_prompt(text, e.text()) for f, text in zip(features, explanations, strict=True)
               for e in f.activating + f.non_activating]
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    token_batches = [[explainer.encode(p) for p in batch] for batch in batches]
    explainer.tokenizer.padding_side = "left"
    rendered = [explainer.render(explanation_prompt(f.explain)) for f in features]
    gen_batches = [explainer.tokenizer(rendered[i : i + cfg.batch_size], return_tensors="pt", padding=True,
                                       add_special_tokens=False) for i in range(0, len(features), cfg.batch_size)]
    timings = {"score": 0.0, "forward": 0.0, "explain": 0.0, "generate": 0.0}
    for _ in range(args.repeats):
        for batch, token_batch in zip(batches, token_batches, strict=True):
            started = time.perf_counter()
            explainer.yes_probability(batch)
            timings["score"] += time.perf_counter() - started
            started = time.perf_counter()
            bare_forward(explainer, token_batch)
            timings["forward"] += time.perf_counter() - started
        started = time.perf_counter()
        explain(explainer, features, cfg.max_new_tokens)
        timings["explain"] += time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in gen_batches:
                explainer.model.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                         pad_token_id=explainer.tokenizer.pad_token_id)
        timings["generate"] += time.perf_counter() - started
    scored = len(prompts) * args.repeats
    value, baseline = scored / timings["score"], scored / timings["forward"]
    explained = len(features) * args.repeats
    per_minute = explained * 60 / timings["explain"]
    bare_per_minute = explained * 60 / timings["generate"]
    lengths = [len(x) for batch in token_batches for x in batch]
    print(json.dumps({"figure": "explanations", "features": ids, "explanations": explanations}))
    print(json.dumps({
        "benchmark": "interp_detection_scoring",
        "value": round(value, 2),
        "unit": "prompts/s",
        "baseline": "bare forward of the same model over the same prompts' full token sequences to one position's "
                    "logits, same batches (right-padded, no prefix reuse)",
        "baseline_value": round(baseline, 2),
        "ratio": round(value / baseline, 4),
        "goal": ">= 0.8",
        "features_explained_per_minute": round(per_minute, 2),
        "bare_generate_features_per_minute": round(bare_per_minute, 2),
        "explain_ratio": round(per_minute / bare_per_minute, 4),
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "explanation_prompt_tokens_mean": round(float(sum(int(b["attention_mask"].sum()) for b in gen_batches))
                                                / len(features), 1),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "model": str(params.base_model.output_dir),
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
