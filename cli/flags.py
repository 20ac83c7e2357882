"""Command-line flags derived from the config dataclasses, so each setting is declared once: the field, its type,
its default and its help text live in training/ (`field(metadata={"help": ...})`), and this module turns them into
argparse flags and the parsed flags back into field values.

A field is a flag when its metadata has "help". The other keys it may carry:
  flag       the option string (default: --field-name); a bool field spelt "--no-..." stores False when given
  choices    the values argparse accepts
  metavar    the value's name in --help
  negatable  a bool field with both --x and --no-x (argparse's BooleanOptionalAction)
  default    the flag's default where it is not the field's own (e.g. "auto", resolved later by the command)
The flag's type follows the field's annotation: int and float convert, str stays text, bool is a switch, and a
dict is a repeatable KEY=VALUE whose value is read as JSON when it parses (so depth=6 is the int 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

FLAG_KEYS = frozenset({"help", "flag", "choices", "metavar", "negatable", "default"})


def parse_key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE -> (key, value): the value as JSON when it parses (numbers, true/false, lists), else the text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of the dataclass `cls` that are flags (metadata with "help"), in declaration order."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    for f in fields:
        unknown = set(f.metadata) - FLAG_KEYS
        if unknown:  # a misspelt key would otherwise be dropped without a word
            raise TypeError(
                f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(unknown)}; known: {sorted(FLAG_KEYS)}"
            )
    return fields


def option_string(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def _value_type(hint: Any) -> type:
    """int | None -> int; dict[str, Any] -> dict; str -> str: the type a flag's value converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _argument(f: dataclasses.Field[Any], hint: Any, unset: bool) -> dict[str, Any]:
    """add_argument's keyword arguments for one field."""
    meta = f.metadata
    kind = _value_type(hint)
    default = meta["default"] if "default" in meta else None if unset else _field_default(f)
    kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": default}
    if kind is bool:
        if meta.get("negatable"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_false" if option_string(f).startswith("--no-") else "store_true"
    elif kind is dict:
        # Appended pairs; an append action copies its default list, so the field's dict becomes a list of pairs.
        kwargs.update(action="append", type=parse_key_value, metavar=meta.get("metavar", "KEY=VALUE"))
        kwargs["default"] = None if default is None else list(default.items())
    else:
        kwargs.update(type=kind if kind in (int, float) else None, choices=meta.get("choices"))
        kwargs["metavar"] = meta.get("metavar")
    return kwargs


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, unset: bool = False) -> None:
    """Add one flag per flag field of the dataclass `cls`. unset=True: a flag not given parses to None (unless its
    metadata names a default), for a config whose defaults are decided later (a training recipe's)."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        parser.add_argument(option_string(f), **_argument(f, hints[f.name], unset))


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Field name -> parsed value for every flag field of `cls` (None where an unset flag was not given)."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(args, f.name) for f in flag_fields(cls)}
    for name, value in values.items():
        if value is not None and _value_type(hints[name]) is dict:
            values[name] = dict(value)  # [(key, value), ...] -> {key: value}, a later KEY winning
    return values
