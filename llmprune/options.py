"""One source of defaults: configuration dataclasses whose fields carry their help text (peft
style), and the command-line flags generated from them.

A stage's config declares each knob once:

    @dataclass
    class CompressConfig:
        ratio: float = option(0.2, help="fraction of decoder-layer parameters removed")

`add_config_arguments(parser, CompressConfig)` adds `--ratio` with that help and the dataclass
default in it; the flag's argparse default is None, so `config_from_args` passes only what the
user typed and the dataclass fills the rest. The Python API and the CLI therefore resolve the same
call to the same config, and validation lives in the dataclass alone."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None,
           choices: tuple | Callable[[], tuple] | None = None, cli: bool = True, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, default_factory: Callable[[], Any] | Any = _MISSING,
           default_text: str | None = None, nargs: str | None = None) -> Any:
    """A dataclass field with its help text and how it appears on the command line.

    flag: the option string (default `--field-name`); choices: allowed values, or a function
    returning them (a registry's names, looked up when the parser is built); cli=False keeps the
    field out of the CLI; parse: the argparse type (default from the annotation); default_text:
    how the default is shown in --help when the value itself says little (e.g. None); nargs:
    argparse's, for a field that takes several values on one flag (`--quantize int8 int4`)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "cli": cli, "metavar": metavar, "parse": parse,
                "default_text": default_text, "nargs": nargs}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(cls: type, name: str) -> str:
    """The help text of one field."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


# -- argparse types for `parse=` (a bad value becomes one line from the parser, exit code 2) --
def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be {'at least 1' if least == 1 else f'{least} or more'}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number, 0 or more (seeds: numpy's cannot be negative)."""
    return _int(text, 0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a non-negative number")
    return value


def fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value



def _base_type(annotation) -> type:
    """int for `int`, `int | None`; str for unions of several types (the dataclass parses them)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        return _base_type(real[0]) if len(real) == 1 else str
    if typing.get_origin(annotation) is tuple:
        return tuple
    return annotation if isinstance(annotation, type) else str


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _default_of(field: dataclasses.Field):
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return None


def _shown_default(field: dataclasses.Field) -> str:
    if field.metadata.get("default_text"):
        return field.metadata["default_text"]
    value = _default_of(field)
    if isinstance(value, tuple):
        return (" " if field.metadata.get("nargs") else ",").join(map(str, value)) or "none"
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One flag per CLI field of `cls`, its help ending with the dataclass default."""
    hints = typing.get_type_hints(cls)
    for field in cli_fields(cls):
        if field.name in exclude:
            continue
        meta = field.metadata
        kind = _base_type(hints[field.name])
        choices = meta.get("choices")
        shown = "" if _default_of(field) is False else f" (default: {_shown_default(field)})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": meta["help"] + shown}
        if kind is bool:
            kwargs["action"] = "store_true" if _default_of(field) is False else argparse.BooleanOptionalAction
        else:
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
                kind = str if kind is tuple else kind
            kwargs["type"] = meta.get("parse") or {tuple: _comma_list}.get(kind, kind)
            if choices is not None:
                kwargs["choices"] = choices() if callable(choices) else choices
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(field), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **fixed):
    """The config the flags describe: only the flags given, the dataclass defaults for the rest."""
    given = {f.name: getattr(args, f.name) for f in cli_fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**{**given, **fixed})
