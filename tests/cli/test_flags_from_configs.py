"""One source of defaults: every config field the CLI exposes is a flag generated from the
dataclass, with the field's help, and a command line that names no option gives exactly the
config the Python API builds by default."""

from __future__ import annotations

import pytest

from llmprune.cli.main import build_parser
from llmprune.options import cli_fields, config_from_args, flag_of


def _configs():
    from llmprune.compress import CompressConfig
    from llmprune.export import ExportConfig
    from llmprune.fedrecover import RecoverConfig

    return {
        "compress": (CompressConfig, ["--ratio", "0.2", "--out", "o"], {"ratio": 0.2}),
        "recover": (RecoverConfig, ["--model", "m", "--data", "d", "--out", "o"], {}),
        "export": (ExportConfig, ["--model", "m", "--out", "o"], {}),
    }


@pytest.mark.parametrize("command", ["compress", "recover", "export"])
def test_no_options_give_the_api_defaults(command):
    cls, argv, api_kwargs = _configs()[command]
    args = build_parser().parse_args([command, *argv])
    assert config_from_args(cls, args) == cls(**api_kwargs)


@pytest.mark.parametrize("command", ["compress", "recover", "export"])
def test_every_cli_field_is_a_flag_with_the_field_help(command):
    cls, _, _ = _configs()[command]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    by_flag = {opt: action for action in sub._actions for opt in action.option_strings}
    for field in cli_fields(cls):
        action = by_flag.get(flag_of(field))
        assert action is not None, f"{command}: no flag for {field.name}"
        assert action.dest == field.name
        assert action.help.startswith(field.metadata["help"])
