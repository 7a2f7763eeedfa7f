"""Flags generated from config dataclasses: help and defaults come from the fields, and an
unspecified flag leaves the dataclass default in place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from llmprune.options import add_config_arguments, cli_fields, config_from_args, help_of, option


@dataclass
class Knobs:
    ratio: float = option(0.2, help="fraction removed")
    name: str = option("comp", help="method", choices=lambda: ("comp", "wanda-sp"))
    share: float | str | None = option(None, help="layer share", default_text="auto")
    steps: int | None = option(None, help="steps")
    heads: bool = option(False, help="prune heads")
    modules: tuple[str, ...] = option(("q", "k"), help="targets")
    hidden: int = option(3, help="not a flag", cli=False)


def parse(*argv: str) -> Knobs:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Knobs)
    return config_from_args(Knobs, parser.parse_args(list(argv)))


def test_no_flags_give_the_dataclass_defaults():
    assert parse() == Knobs()


def test_flags_are_typed_from_the_annotations():
    k = parse("--ratio", "0.3", "--name", "wanda-sp", "--share", "auto", "--steps", "5", "--heads", "--modules", "a, b")
    assert k == Knobs(ratio=0.3, name="wanda-sp", share="auto", steps=5, heads=True, modules=("a", "b"))


def test_choices_come_from_the_function_and_bad_values_are_refused():
    with pytest.raises(SystemExit):
        parse("--name", "nope")
    with pytest.raises(SystemExit):
        parse("--steps", "many")


def test_help_shows_the_default_and_cli_false_fields_are_not_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Knobs)
    text = parser.format_help()
    assert "fraction removed (default: 0.2)" in text and "(default: auto)" in text and "(default: q,k)" in text
    assert "--hidden" not in text
    assert [f.name for f in cli_fields(Knobs)] == ["ratio", "name", "share", "steps", "heads", "modules"]
    assert help_of(Knobs, "hidden") == "not a flag"


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", float("inf")])
def test_no_number_setting_takes_infinity_or_nan(text):
    import argparse

    from llmprune.options import non_negative_float, positive_float

    for parse in (positive_float, non_negative_float):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
