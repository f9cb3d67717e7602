"""The `saepipe` command: one subcommand per DVC stage.

Each subcommand reads `params.yaml` (`--params`) and accepts one flag per field of its own section,
overriding that value for a one-off run. A UserError becomes exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from saepipe.config import DEFAULT_PARAMS, SECTIONS, Overrides, coerce, flat_fields, load_params
from saepipe.config.fields import FlatField
from saepipe.errors import UserError


@dataclass(frozen=True)
class Stage:
    module: str
    """The module with `run(params)`."""
    section: str | None
    """The params.yaml section its flags override (None: it reads no section and runs as `run(args)`)."""
    arguments: bool = False
    """The module adds arguments of its own (`add_arguments(parser)`) and runs as `run(params, args)`."""


STAGES: dict[str, Stage] = {
    "process": Stage("saepipe.stages.process", "process"),
    "base-model": Stage("saepipe.stages.base_model", "base_model"),
    "tokenize": Stage("saepipe.stages.tokenize", "tokenize"),
    "activations": Stage("saepipe.stages.activations", "activations"),
    "train": Stage("saepipe.stages.train", "train"),
    "export": Stage("saepipe.stages.export", "export"),
    "evaluate": Stage("saepipe.stages.evaluate", "evaluate"),
    "activation-db": Stage("saepipe.stages.activation_db", "activation_db"),
    "matrices": Stage("saepipe.stages.matrices", "matrices"),
    "summarize": Stage("saepipe.stages.summarize", "summarize"),
    "interp": Stage("saepipe.stages.interp", "interp"),
    "report": Stage("saepipe.stages.report", "report"),
    "upload": Stage("saepipe.stages.upload", "export"),
    "show-feature": Stage("saepipe.stages.show_feature", "summarize", arguments=True),
    "models": Stage("saepipe.stages.models", None, arguments=True),
    "synth": Stage("saepipe.stages.synth", None, arguments=True),
    "compare": Stage("saepipe.stages.compare", "compare", arguments=True),
}
# Subcommands whose purpose is not their params section's (they share it with another stage).
SUMMARIES = {
    "upload": "Upload models/sae/<run_name>/ with a generated model card to the Hugging Face hub (not a DVC stage).",
    "show-feature": "Print one feature's stats and top examples, or the features of a token (not a DVC stage).",
    "models": "One SAE per model of pipelines/models/params.yaml: write a model's params, list, or reproduce some.",
    "synth": "Synthetic activations from a known dictionary (generate), and an SAE scored against it (score).",
    "compare": "Finished runs and experiments side by side: the table, the L0 frontier, seed noise; and features "
               "matched across two runs (not a DVC stage).",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_field_flag(group: argparse._ArgumentGroup, field: FlatField, note: str = "") -> None:
    hint, doc = field.hint, field.doc + note
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    base = inner[0] if typing.get_origin(hint) in (typing.Union, typing.types.UnionType) else hint
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": doc}
    if "choices" in field.field.metadata:
        kwargs["choices"] = field.field.metadata["choices"]()
    elif base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is list:
        kwargs.update(nargs="+", metavar="VALUE")
    elif typing.get_origin(base) is Literal:
        kwargs["choices"] = list(typing.get_args(base))
    else:
        kwargs["metavar"] = {int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")
        if base is not hint:
            kwargs["help"] = f"{doc} ('null' to unset)"
    group.add_argument(_flag(field.name), **kwargs)


def _parse_flag_value(raw: Any, hint: Any, field: str) -> Any:
    """Turn a flag's text into the field's type, with the same checks as params.yaml."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):
        return [_parse_flag_value(item, typing.get_args(hint)[0] if typing.get_origin(hint) is list else str,
                                  field) for item in raw]
    if raw in ("null", "none", "None"):
        return coerce(None, hint, field)
    allows_str = hint is str or str in typing.get_args(hint)
    value = raw if allows_str else yaml.safe_load(raw)
    return coerce(value, hint, field)


def build_parser(only: str | None = None) -> OneLineParser:
    """The whole CLI; with `only`, the flags of that one subcommand (the others are listed but bare, so
    that running one stage never imports what another stage's choices need)."""
    parser = OneLineParser(
        prog="saepipe",
        description="Train sparse autoencoders on a language model's activations, one DVC stage at a time. "
        "Every stage reads its section of params.yaml; flags override single values for one run.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True, parser_class=OneLineParser)
    for name, spec in STAGES.items():
        summary = SUMMARIES[name] if name in SUMMARIES else SECTIONS[spec.section].__doc__
        reads = "" if spec.section is None else \
            f" Reads params section '{spec.section}'; each flag overrides one of its values for this run."
        stage = sub.add_parser(name, help=summary, description=summary + reads)
        if only is not None and name != only:
            continue
        stage.add_argument("--params", default=DEFAULT_PARAMS, metavar="FILE",
                           help=f"the params file to read (default: {DEFAULT_PARAMS}); keys it leaves out come "
                           f"from ./{DEFAULT_PARAMS}")
        module = importlib.import_module(spec.module) if spec.arguments else None
        if module is not None:
            module.add_arguments(stage)
        if spec.section is None:
            continue
        # A module that borrows another stage's section may leave out the fields it does not use, and note
        # how it reads the others (e.g. a tighter bound).
        unused, notes = getattr(module, "UNUSED_FIELDS", ()), getattr(module, "FIELD_NOTES", {})
        group = stage.add_argument_group(f"{spec.section} params")
        for field in flat_fields(SECTIONS[spec.section]):
            if field.name not in unused:
                _add_field_flag(group, field, notes.get(field.name, ""))
    return parser


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    section = STAGES[args.stage].section
    fields = {f.name: f for f in flat_fields(SECTIONS[section]) if hasattr(args, f.name)}
    return {section: {k: _parse_flag_value(getattr(args, k), f.hint, f"{section}.{k}") for k, f in fields.items()}}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn a kill into an exception, so that temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=next((a for a in argv if a in STAGES), None))
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        spec = STAGES[args.stage]
        if spec.section is None:
            importlib.import_module(spec.module).run(args)
            return 0
        params = load_params(args.params, overrides_from_args(args), strict=(spec.section,))
        module = importlib.import_module(spec.module)
        if spec.arguments:
            module.run(params, args)
        else:
            module.run(params)
    except UserError as exc:
        print(f"saepipe {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saepipe {args.stage}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
