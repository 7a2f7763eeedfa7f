"""Argument types and output helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


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


def add_model_argument(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = "model: HF folder, .gguf file, hub id (org/name) or 'gemma-3-270m' (default)"
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--model", default=None, help=help_text)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
