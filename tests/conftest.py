"""Shared fixtures.

Unit tests use tiny random models (llmprune.testing) of every supported architecture and run in
seconds. Tests marked `integration` use the real packaged Gemma-3-270M and ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmprune.testing import tiny_checkpoint, tiny_model, tiny_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# The test files that use the README's real compress (`readme_examples`, minutes): one xdist worker runs
# them all, so that it runs once (pytest_itemcollected refuses a test elsewhere that uses it).
README_EXAMPLES_FILES = ("tests/test_readme.py", "tests/compress/test_integration.py")


def pytest_xdist_make_scheduler(config, log):
    """pyproject runs two pytest-xdist workers (`-n 2`): a file at a time, so that its module fixtures
    (often a whole simulated run) are built once, and the README_EXAMPLES_FILES together. (xdist's own
    `--dist loadgroup` marks do not reach its scheduler under pytest 9.)"""
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "readme-examples" if path in README_EXAMPLES_FILES else path

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(LONGEST_FIRST):     # the longest files start first, so both workers end together
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ByFile(config, log)


# The files that take longest (a clean CI run's durations, longest first); the others follow in xdist's order.
LONGEST_FIRST = ("readme-examples", "tests/export/test_integration.py", "tests/cli/test_recover_cli.py",
                 "tests/fedrecover/test_deployment.py", "tests/cli/test_cli.py", "tests/fedrecover/test_adaptive.py",
                 "tests/fedrecover/test_simulation.py", "tests/fedrecover/test_submodels.py",
                 "tests/fedrecover/test_split.py", "tests/fedrecover/test_fleet_vocab.py",
                 "tests/fedrecover/test_distill.py")


def pytest_itemcollected(item):
    path = item.nodeid.split("::", 1)[0]
    if "readme_examples" in item.fixturenames and path not in README_EXAMPLES_FILES:
        raise pytest.UsageError(f"{path} uses readme_examples: add it to README_EXAMPLES_FILES in tests/conftest.py")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread; several threads on a busy 2-core machine make a
    256-step generate take 20 s instead of 0.3 s. Integration tests keep the default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    """A tiny random model of `arch` (eval mode)."""
    return tiny_model(arch)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE tokenizer (<pad>=0, <bos>=1, <eos>=2). Do not mutate it."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(arch, **overrides) -> a saved tiny HF folder (cached per session; read only)."""
    made: dict = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{arch}"), arch, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint: an architecture llmprune does not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("ckpt-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (read only: never write under it)."""
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"real data not found: {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer) of the packaged Gemma-3-270M, loaded once per session."""
    import llmprune

    model, tok = llmprune.load("gemma-3-270m")
    return model, tok


@pytest.fixture(scope="session")
def readme_examples(tmp_path_factory, shared_data):
    """The README's Python examples, every ```python block in order, run once in one fresh
    interpreter from a working folder with ../shared beside it (as the README assumes). Its
    compress call writes `work/pruned`: the one real-model compress the integration tests share."""
    import re
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    (root / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    script = work / "readme_examples.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=work, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         capture_output=True, text=True, timeout=1200)
    return SimpleNamespace(returncode=run.returncode, stdout=run.stdout, stderr=run.stderr, work=work)


def llmprune_command() -> list[str]:
    """The installed `llmprune` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("llmprune")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from llmprune.cli.main import main; sys.exit(main())"]


def run_cli(*args, cwd, env: dict | None = None, timeout: float = 300, threads: int | None = 1):
    """Run the real console script as a subprocess; returns CompletedProcess (text mode)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if threads is not None:
        full_env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        llmprune_command() + [str(a) for a in args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def _third_party_logging_state():
    """What cli.main._quiet_third_party changes besides warnings and os.environ: a restore function."""
    import logging

    alembic = logging.getLogger("alembic")
    saved = [lambda level=alembic.level: alembic.setLevel(level)]
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as hf_logging
    except ImportError:
        return lambda: [restore() for restore in saved]
    verbosity, bars, hub_verbosity = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), hub_logging.get_verbosity()
    saved.append(lambda: hf_logging.set_verbosity(verbosity))
    saved.append(hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)
    saved.append(lambda: hub_logging.set_verbosity(hub_verbosity))
    return lambda: [restore() for restore in saved]


def _python_default_warning_filters() -> None:
    """The warnings filters of a fresh `python` without -W (pytest's, e.g. 'always' for
    DeprecationWarning, are not what the console script runs under), printing to sys.stderr."""
    import warnings

    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category, append=True)

    def to_stderr(message, category, filename, lineno, file=None, line=None):  # as Python prints them
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = to_stderr


def run_main(*args, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """`llmprune ARGS` in this process: llmprune.cli.main.main(argv), run in `cwd`; returns a
    CompletedProcess (text mode) as run_cli does, without paying a new interpreter's imports.

    What a subprocess would give and is kept: stdout and stderr captured at the file-descriptor
    level (also what C++ code or sys.__stderr__ writes), decoded as subprocess.run(text=True)
    decodes them (universal newlines, so tqdm's '\\r' become line breaks); an argparse exit
    (SystemExit) and an exception escaping main() become the return code (with the traceback on
    stderr, code 1); main()'s logging.basicConfig takes effect (the root logger's handlers are
    set aside for the call, so its log lines land on this stderr), library loggers' own stderr
    handlers (transformers') write to this stderr; Python's default warnings filters.
    Restored after the call: the current directory, os.environ, the root logger, the warnings
    filters, transformers/huggingface_hub verbosity, torch's thread count and the global RNGs.

    Not reproducible here (use run_cli): environment variables read at import (HF_ENDPOINT,
    OMP_NUM_THREADS...; `env` is set for the call only, for what is read while running), import-time
    output, signals, an uncaught exception's traceback as the interpreter prints it, the
    installed console script."""
    saved_env = dict(os.environ)
    import io
    import locale
    import logging
    import random
    import tempfile
    import traceback
    import warnings

    import numpy as np

    from llmprune.cli.main import main

    argv = [str(a) for a in args]
    encoding = locale.getpreferredencoding(False)
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    restore_third_party = _third_party_logging_state()
    saved_cwd, saved_threads = os.getcwd(), torch.get_num_threads()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file, warnings.catch_warnings():
        saved_fds = os.dup(1), os.dup(2)
        redirected: list = []  # (handler, its stream) of library loggers that wrote to our stderr/stdout
        try:
            os.dup2(out_file.fileno(), 1)
            os.dup2(err_file.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding, write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                          errors="backslashreplace", write_through=True)
            new = {id(streams[0]): sys.stdout, id(sys.__stdout__): sys.stdout,
                   id(streams[1]): sys.stderr, id(sys.__stderr__): sys.stderr}
            for logger in list(logging.Logger.manager.loggerDict.values()):
                for handler in getattr(logger, "handlers", ()):
                    if isinstance(handler, logging.StreamHandler) and id(handler.stream) in new:
                        redirected.append((handler, handler.stream))
                        handler.stream = new[id(handler.stream)]
            _python_default_warning_filters()
            root.handlers.clear()
            root.setLevel(logging.WARNING)
            os.environ.update({"TOKENIZERS_PARALLELISM": "false", **(env or {})})
            os.chdir(cwd)
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage errors, --help, --version
                code = exc.code
                if code is not None and not isinstance(code, int):
                    sys.stderr.write(f"{code}\n")
                    code = 1
            except Exception:  # what the interpreter would do with an exception main() let out
                traceback.print_exc()
                code = 1
            for stream in (sys.stdout, sys.stderr):
                if not stream.closed:
                    stream.flush()
        finally:
            os.chdir(saved_cwd)
            for key in set(os.environ) - set(saved_env):
                del os.environ[key]
            os.environ.update(saved_env)
            for handler in root.handlers:
                if handler not in root_handlers:  # basicConfig's, on the stderr of this call
                    handler.close()
            root.handlers[:] = root_handlers
            root.setLevel(root_level)
            for handler, stream in redirected:
                handler.stream = stream
            restore_third_party()
            torch.set_num_threads(saved_threads)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
            sys.stdout, sys.stderr = streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
        out_file.seek(0)
        err_file.seek(0)
        stdout = io.TextIOWrapper(io.BytesIO(out_file.read()), encoding=encoding).read()
        stderr = io.TextIOWrapper(io.BytesIO(err_file.read()), encoding=encoding, errors="strict").read()
    return subprocess.CompletedProcess(["llmprune", *argv], code if code is not None else 0, stdout, stderr)
