"""Argument types and output helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import json
import sys

# The argparse types live beside the config fields that use them (llmprune.options).
from llmprune.options import fraction, non_negative_float, positive_float, positive_int  # noqa: F401

DTYPES = ("float32", "bfloat16", "float16")


def add_model_argument(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = "model: HF folder, .gguf file, hub id (org/name) or 'gemma-3-270m' (default)"
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--model", default=None, help=help_text)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")


def add_push_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="also upload the output folder (with its model card) to this Hugging Face model repo; "
                             "checked before any work: offline it is an error and nothing is written")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
