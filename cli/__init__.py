"""The `llmprune` command line: a thin layer that fills each stage's config and calls the library."""

from .main import main

__all__ = ["main"]
