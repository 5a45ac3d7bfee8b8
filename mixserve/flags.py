"""Command-line flags derived from the frozen config dataclasses: one source of names, types, defaults
and help text (each field's docstring). `cli.py` only chooses which fields a subcommand exposes.

A field `max_num_seqs: int = 128` becomes `--max-num-seqs` (type int, default 128, help = its
docstring); `bool` fields become `--x/--no-x`; `Literal` fields get choices; `X | None` fields default
to None; `tuple[...]` fields take a comma-separated list, or are repeatable (`Flag.repeat`).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mixserve.config import ConfigError, FieldError, field_docs


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line when the plain derivation is not enough."""

    names: tuple[str, ...] = ()
    """Extra option strings (short forms and historical names), e.g. ("-t",)."""
    default: Any = None
    """With `override_default`: a command-line default that differs from the dataclass default."""
    repeat: bool = False
    """A tuple field given once per value (`--stop a --stop b`) instead of as a comma list."""
    parse: Callable[[str], Any] | None = None
    """Converts the text to the field's value (instead of the type-derived conversion)."""
    metavar: str | None = None
    override_default: bool = False
    """Use `default` instead of the dataclass default (say why where the flag is declared)."""
    action: type[argparse.Action] | None = None
    """A custom argparse action (e.g. a flag that may repeat on one command and not on another)."""
    help: str = ""
    """Appended to the field's docstring."""


def flag_name(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _comma_list(text: str, item: Callable[[str], Any], name: str) -> tuple[Any, ...]:
    try:
        return tuple(item(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise FieldError(f"invalid {name}={text!r}: expected a comma-separated list of "
                         f"{getattr(item, '__name__', 'values')}", field=name) from None


def add_flags(group: argparse._ActionsContainer, cls: type, *, prefix: str = "",
              only: Iterable[str] | None = None, flags: Mapping[str, Flag] | None = None,
              dest_prefix: str = "") -> list[str]:
    """Add a flag `--{prefix}{name}` per field of dataclass `cls` (all, or those in `only`), stored
    at dest `{dest_prefix}{prefix}{name}` (a dest prefix keeps apart fields of two dataclasses that
    share a name, e.g. an evaluation's seed and a model's). Returns the dest names, for `values_from`."""
    hints = get_type_hints(cls, include_extras=False)
    docs = field_docs(cls)
    flags = flags or {}
    chosen = list(only) if only is not None else [f.name for f in fields(cls) if f.init]
    by_name = {f.name: f for f in fields(cls)}
    dests = []
    for name in chosen:
        f, spec = by_name[name], flags.get(name, Flag())
        dest = dest_prefix + prefix + name
        default = spec.default if spec.override_default else \
            f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
        tp = _unwrap_optional(hints[name])
        help_text = (docs.get(name, "") + (" " + spec.help if spec.help else "")).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "default": default, "metavar": spec.metavar}
        if tp is bool:
            kwargs.pop("metavar")
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs.pop("metavar")
            if spec.parse is not None:  # an alias spelling, mapped onto a choice
                kwargs["type"] = spec.parse
        elif get_origin(tp) is tuple:
            item = get_args(tp)[0]
            if spec.repeat:
                kwargs.update(action="append", type=spec.parse or item, default=None)
                help_text += " (repeatable)"
            else:
                kwargs["type"] = str  # parsed in `values_from`, so a bad list is a FieldError, not an exit
                help_text += " (comma-separated)"
        else:
            kwargs["type"] = spec.parse or tp
        if spec.action is not None:
            kwargs["action"] = spec.action
        if isinstance(default, tuple) and not spec.repeat:
            kwargs["default"] = default = ",".join(map(str, default))
        shown = default
        if shown not in (None, (), ""):
            help_text += f" (default: {shown})"
        group.add_argument(flag_name(prefix, name), *spec.names, help=help_text, **kwargs)
        dests.append(dest)
    return dests


def values_from(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` present in `args` (added by `add_flags` with the same prefix), converted;
    a malformed comma list raises FieldError naming the field."""
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if not hasattr(args, prefix + f.name):
            continue
        value = getattr(args, prefix + f.name)
        tp = _unwrap_optional(hints[f.name])
        if get_origin(tp) is tuple:
            if value is None:
                value = ()
            elif isinstance(value, list):  # a repeatable field
                value = tuple(value)
            elif isinstance(value, str):
                value = _comma_list(value, get_args(tp)[0], f.name)
        out[f.name] = value
    return out


def parse_size(text: str) -> int:
    """Bytes from `1GiB`, `512MB`, `1000000`; raises ConfigError for anything else."""
    from mixserve.config import ExpertBudget

    budget = ExpertBudget.parse(text, "size")
    if budget.num_bytes is None:
        raise ConfigError(f"invalid size {text!r}: expected bytes with a unit (1GiB, 512MB)", field="size")
    return budget.num_bytes


__all__ = ["Flag", "add_flags", "flag_name", "parse_size", "values_from"]
