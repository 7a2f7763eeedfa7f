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
import math
import types
import typing
from collections.abc import Callable
from typing import Any

_MISSING = dataclasses.MISSING


RESUME_RULES = ("match", "free", "grow")


def option(default: Any = _MISSING, *, help: str, flag: str | None = None,
           choices: tuple | Callable[[], tuple] | None = None, cli: bool = True, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, default_factory: Callable[[], Any] | Any = _MISSING,
           default_text: str | None = None, nargs: str | None = None, resume: str = "match") -> Any:
    """A dataclass field with its help text and how it appears on the command line.

    flag: the option string (default `--field-name`); its name is the argparse dest; choices:
    allowed values, or a function returning them (a registry's names, looked up when the parser is
    built); cli=False keeps the field out of the CLI; parse: the argparse type (default from the
    annotation), also what turns a run-config value into the field's value; default_text: how the
    default is shown in --help when the value itself says little (e.g. None); nargs: argparse's,
    for a field that takes several values on one flag (`--quantize int8 int4`); resume: what a
    resumed run may do with the setting — "match" (keep it), "free" (change it), "grow" (raise it)."""
    if resume not in RESUME_RULES:
        raise ValueError(f"resume must be one of {RESUME_RULES}, not {resume!r}")
    metadata = {"help": help, "flag": flag, "choices": choices, "cli": cli, "metavar": metavar, "parse": parse,
                "default_text": default_text, "nargs": nargs, "resume": resume}
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


def dest_of(field: dataclasses.Field) -> str:
    """The argparse dest of a field's flag: the flag's name (`--fleet` -> fleet), which is the
    field's name unless the field declares another flag."""
    return flag_of(field).lstrip("-").replace("-", "_")


# -- argparse types for `parse=` (a bad value becomes one line from the parser, exit code 2) --
# Each takes the text of a flag or a run-config entry, or a value of its own type (the Python API),
# so that one function validates a setting whichever way it arrives (see coerce_fields).
def _int(text, least: int) -> int:
    bad = isinstance(text, bool) or (isinstance(text, float) and not text.is_integer())
    try:
        value = int(text) if not bad else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number")
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be {'at least 1' if least == 1 else f'{least} or more'}")
    return value


def positive_int(text) -> int:
    return _int(text, 1)


def non_negative_int(text) -> int:
    """A whole number, 0 or more (seeds: numpy's cannot be negative)."""
    return _int(text, 0)


def int_at_least(least: int) -> Callable[[str], int]:
    """A parser of whole numbers of at least `least`."""
    def parse(text) -> int:
        return _int(text, least)

    parse.__name__ = f"int_at_least_{least}"
    return parse


def _float(text) -> float:
    try:
        if isinstance(text, bool):
            raise ValueError
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):       # no setting means infinity or nan; a timeout says "none" instead
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_float(text) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_float(text) -> float:
    try:
        value = _float(text)
    except argparse.ArgumentTypeError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a non-negative number")
    return value


def fraction(text) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def vocab_size(text: str) -> int | float:
    """--vocab: a whole number is a token count K, anything else a coverage fraction ("1" keeps
    one id; "1.0" keeps every id the data uses)."""
    import argparse

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a token count nor a fraction") from None


def one_of(*choices: str) -> Callable[[str], str]:
    """A parser that accepts one of `choices` (for Literal fields)."""
    def parse(text) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(choices)}")
        return str(text)

    parse.__name__ = "one_of"
    return parse


def coerce_fields(obj) -> None:
    """Run every field's `parse` on its value, in place: what the Python API passes (text or a
    typed value) is checked and typed by the same function as a flag or a run-config entry. A bad
    value is one LLMPruneError naming the flag and an example."""
    from .errors import LLMPruneError

    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        parse, value = field.metadata.get("parse"), getattr(obj, field.name)
        if parse is None or value is None:
            continue
        try:
            if isinstance(value, str) and _base_type(hints[field.name]) in (int, float):
                raise argparse.ArgumentTypeError(f"{value!r} is text, not a number")   # the API takes numbers
            setattr(obj, field.name, parse(value))
        except argparse.ArgumentTypeError as exc:
            default = _default_of(field)
            fix = (f"pass e.g. {flag_of(field)} {_shown_default(field)}" if default not in (None, "", ())
                   else f"{flag_of(field)} takes {field.metadata['help']}")
            raise LLMPruneError(f"{flag_of(field)}: {exc}", fix) from None


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


def add_config_arguments(parser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One flag per CLI field of `cls`, its help ending with the dataclass default. `parser` may
    be an argparse group; `exclude` names dests (field names) to leave out."""
    hints = typing.get_type_hints(cls)
    for field in cli_fields(cls):
        if field.name in exclude or dest_of(field) in exclude:
            continue
        meta = field.metadata
        kind = _base_type(hints[field.name])
        choices = meta.get("choices")
        shown = "" if _default_of(field) is False else f" (default: {_shown_default(field)})"
        kwargs: dict[str, Any] = {"dest": dest_of(field), "default": None, "help": meta["help"] + shown}
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
    given = {f.name: getattr(args, dest_of(f)) for f in cli_fields(cls)
             if getattr(args, dest_of(f), None) is not None}
    return cls(**{**given, **fixed})
