"""The `saepipe` command: one subcommand per DVC stage.

Each subcommand reads `params.yaml` (`--params`) and accepts one flag per field of its own section,
overriding that value for a one-off run. A UserError becomes exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys
import threading
import typing
from typing import Any, Literal

import yaml

from saepipe.config import DEFAULT_PARAMS, SECTIONS, Overrides, coerce, field_docs, load_params
from saepipe.errors import UserError

# subcommand -> (module with `run(params)`, the params.yaml section its flags override)
STAGES: dict[str, tuple[str, str]] = {
    "process": ("saepipe.stages.process", "process"),
    "base-model": ("saepipe.stages.base_model", "base_model"),
    "tokenize": ("saepipe.stages.tokenize", "tokenize"),
    "activations": ("saepipe.stages.activations", "activations"),
    "train": ("saepipe.stages.train", "train"),
    "export": ("saepipe.stages.export", "export"),
    "evaluate": ("saepipe.stages.evaluate", "evaluate"),
    "upload": ("saepipe.stages.upload", "export"),
}
# Subcommands whose purpose is not their params section's (they share it with another stage).
SUMMARIES = {
    "upload": "Upload models/sae/<run_name>/ with a generated model card to the Hugging Face hub (not a DVC stage).",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_field_flag(group: argparse._ArgumentGroup, field: dataclasses.Field, hint: Any, doc: str) -> None:
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    base = inner[0] if typing.get_origin(hint) in (typing.Union, typing.types.UnionType) else hint
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": doc}
    if base is bool:
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


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="saepipe",
        description="Train sparse autoencoders on a language model's activations, one DVC stage at a time. "
        "Every stage reads its section of params.yaml; flags override single values for one run.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True, parser_class=OneLineParser)
    for name, (_, section) in STAGES.items():
        cls = SECTIONS[section]
        summary = SUMMARIES.get(name, cls.__doc__)
        stage = sub.add_parser(name, help=summary, description=f"{summary} Reads params section "
                               f"'{section}'; each flag overrides one of its values for this run.")
        stage.add_argument("--params", default=DEFAULT_PARAMS, metavar="FILE",
                           help=f"the params file to read (default: {DEFAULT_PARAMS})")
        group = stage.add_argument_group(f"{section} params")
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            _add_field_flag(group, field, hints[field.name], docs.get(field.name, ""))
    return parser


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    section = STAGES[args.stage][1]
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return {section: {k: _parse_flag_value(v, hints[k], f"{section}.{k}") for k, v in given.items()}}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn a kill into an exception, so that temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        params = load_params(args.params, overrides_from_args(args))
        module = importlib.import_module(STAGES[args.stage][0])
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
