"""`mixserve generate` flags for structured output: --json-schema FILE, --json, --regex, --choice, --grammar FILE."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixserve.structured.spec import StructuredError, StructuredOutput


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structured output (at most one)")
    group.add_argument("--json-schema", metavar="FILE", default=None,
                       help="constrain the output to the JSON schema in FILE")
    group.add_argument("--json", dest="json_object", action="store_true",
                       help="constrain the output to any JSON object")
    group.add_argument("--regex", default=None, help="constrain the output to this regular expression")
    group.add_argument("--choice", nargs="+", default=None, help="the output is exactly one of these strings")
    group.add_argument("--grammar", metavar="FILE", default=None,
                       help="constrain the output to the Lark or GBNF grammar in FILE")


def structured_from_args(args: argparse.Namespace) -> StructuredOutput | None:
    """The constraint the flags ask for; raises StructuredError naming the flag (and the file)."""
    kwargs: dict[str, object] = {}
    if args.json_schema is not None:
        text = _read(args.json_schema, "--json-schema")
        try:
            kwargs["json"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StructuredError(f"invalid --json-schema {args.json_schema}: not JSON ({exc})",
                                  field="json_schema") from exc
    if args.json_object:
        kwargs["json_object"] = True
    if args.regex is not None:
        kwargs["regex"] = args.regex
    if args.choice is not None:
        kwargs["choice"] = tuple(args.choice)
    if args.grammar is not None:
        kwargs["grammar"] = _read(args.grammar, "--grammar")
    if not kwargs:
        return None
    if len(kwargs) > 1:
        raise StructuredError("only one of --json-schema, --json, --regex, --choice, --grammar may be given",
                              field="structured")
    try:
        return StructuredOutput(**kwargs)  # type: ignore[arg-type]
    except StructuredError as exc:
        source = args.json_schema or args.grammar
        raise StructuredError(f"{exc}{f' (from {source})' if source else ''}", field=exc.field) from exc


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise StructuredError(f"invalid {flag} {path}: {exc.strerror or exc}", field=flag.lstrip("-")) from exc
