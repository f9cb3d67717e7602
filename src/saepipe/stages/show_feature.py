"""`saepipe show-feature N` / `--search TEXT`: one feature, or the features of a token, in the terminal.

Not a DVC stage: it reads the activation DB, the token cache and the tokenizer, and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

from saepipe.activations.run_name import names_run
from saepipe.analysis.activation_db import ActivationDB
from saepipe.config import Params
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import activation_db
from saepipe.report.terminal import render_feature, render_search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("feature", nargs="?", type=int, help="the feature id to show")
    parser.add_argument("--search", metavar="TEXT",
                        help="list the features most active on a token instead, e.g. photosynthesis "
                        "(matched with and without a leading space)")
    parser.add_argument("--results", type=int, default=10, metavar="N", help="features listed by --search")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="shade activating tokens (auto: when stdout is a terminal)")


@names_run
def run(params: Params, args: argparse.Namespace) -> None:
    if (args.feature is None) == (args.search is None):
        raise UserError("give a feature id or --search TEXT (one of them)")
    if args.search is not None and not args.search.strip():
        raise UserError(f"--search={args.search!r}: expected a token's text (not empty or blank)")
    if args.results < 1:
        raise UserError(f"--results={args.results}: expected an integer >= 1")
    if args.feature is not None and args.feature < 0:
        raise UserError(f"feature={args.feature}: expected an id >= 0")
    cfg = params.summarize
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    tokenizer = load_tokenizer(params.base_model.output_dir)
    with ActivationDB(activation_db(params), tokens=params.tokenize.output, tokenizer=tokenizer) as db:
        if args.search is not None:
            print(render_search(args.search, db.search_tokens(args.search, args.results)))
            return
        context = (cfg.context_before, cfg.context_after)
        stats = db.feature_stats(args.feature)
        top = db.top_examples(args.feature, cfg.top_k, context)
        bands = {q: db.quantile_examples(args.feature, q, cfg.quantile_examples, context) for q in cfg.quantile_bands}
        print(render_feature(stats, top, bands, color))
