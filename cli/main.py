"""Entry point: sub-command dispatch, logging set-up and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmprune.errors import LLMPruneError

from . import compress as compress_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import generate as generate_cmd
from . import info as info_cmd
from . import recover as recover_cmd

COMMANDS = (compress_cmd, recover_cmd, eval_cmd, export_cmd, generate_cmd, info_cmd)
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a single line with the fix, exit code 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} — see '{self.prog} --help'\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from llmprune import __version__

    parser = OneLineParser(prog="llmprune", description="Compress, recover and export causal LMs for edge devices.")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _quiet_third_party(debug: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr's SuperLink state, imported by flwr
    if debug:
        return
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_third_party(args.debug)
    from llmprune.model_card import set_command

    set_command(sys.argv[1:] if argv is None else list(argv))
    try:
        repo = getattr(args, "push_to_hub", None)
        if repo:
            from llmprune.hub import check_hub

            check_hub(repo)                  # before any work: offline, nothing is written
        code = args.run(args) or 0
        if repo and code == 0:
            from llmprune.hub import push_folder

            logging.getLogger("llmprune").info("pushed to %s", push_folder(args.out, repo))
        return code
    except LLMPruneError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"llmprune {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write(f"llmprune {args.command}: interrupted — nothing was written\n")
        return 130
    except Exception as exc:  # an unexpected failure still ends in one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"llmprune {args.command}: unexpected {type(exc).__name__}: {first} "
                         "— rerun with --debug for the traceback\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
