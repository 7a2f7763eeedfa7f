"""The README's Python examples run as written: every ```python block, in order, in one fresh
interpreter, from a working folder with ../shared beside it (as the README assumes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_examples_that_compile():
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")


@pytest.mark.integration
def test_the_readme_python_examples_run_as_written(readme_examples):
    assert readme_examples.returncode == 0, readme_examples.stderr[-4000:]
    lines = readme_examples.stdout.splitlines()
    perplexity, tokens = lines[0].split()
    assert 15 < float(perplexity) < 35 and tokens == "2048"  # the dense model on 4x512 windows: ~23.08
    assert (readme_examples.work / "pruned-py" / "config.json").is_file()  # compress(out="pruned-py/") wrote it
    assert "license: gemma" in (readme_examples.work / "pruned-py" / "README.md").read_text()  # its model card
    cuts = [line.split() for line in lines if line.startswith(("0.1 ", "0.3 "))]
    assert [c[0] for c in cuts] == ["0.1", "0.3"]
    assert abs(float(cuts[0][1]) - 0.1) < 0.02 and abs(float(cuts[1][1]) - 0.3) < 0.02


# ---------------------------------------------------------------- the tour's commands
# The tour runs on a tiny random model wherever a command takes a model; these are the only other
# changes to the commands as written, each because a tiny model cannot take the written value.
TINY_MODEL_NAMES = ("gemma-3-270m", "path/to/hf-folder")
TINY_VALUES = {("--vocab", "32000"): "300",        # the tiny model has 320 token ids (259 always kept)
               ("--uniform-multiple", "256"): "32",  # its MLP is 128 wide
               ("--quantize", "q4_k_m"): "q8_0"}     # no weight of 64-wide rows fits a K-quant's 256-blocks
TAKES_A_MODEL = {"compress": "--model", "eval": "--model", "info": None}


def tour_commands() -> list[list[str]]:
    """Each `llmprune` command of the README's tour (```bash blocks from "A 5-minute tour" to
    "Documentation"), continuation lines joined and comments dropped, as argument lists."""
    import shlex

    text = README.read_text(encoding="utf-8")
    tour = text[text.index("## A 5-minute tour"):text.index("## Documentation")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", tour, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                assert words[0] == "llmprune", line
                commands.append(words[1:])
    return commands


def expand(command: list[str], earlier: list[list[str]]) -> tuple[list[str], bool]:
    """The command with the README's `...` filled in from the last full command of its kind: right
    after the sub-command it stands for that command's arguments, after a flag for that flag's
    value. Returns (command, whether it stood for the arguments: such a line shows a variation
    whose files, such as a fleet file, the README leaves to the reader)."""
    if "..." not in command:
        return command, False
    same = [c for c in earlier if c[0] == command[0] and "..." not in c]
    assert same, f"'...' in {command} with no earlier full '{command[0]}' command"
    last = same[-1]
    out = [command[0]]
    for i, word in enumerate(command[1:], 1):
        if word != "...":
            out.append(word)
        elif i == 1:
            out.extend(last[1:])
        else:
            flag = command[i - 1]
            out.extend(_values(last, flag))
    return out, command[1] == "..."


def _values(command: list[str], flag: str) -> list[str]:
    at = command.index(flag)
    values = []
    for word in command[at + 1:]:
        if word.startswith("--"):
            break
        values.append(word)
    return values[1:] if len(values) > 1 and values[0] == "..." else values


def on_tiny(command: list[str], tiny: str) -> list[str]:
    out = [tiny if w in TINY_MODEL_NAMES else TINY_VALUES.get((command[i - 1] if i else "", w), w)
           for i, w in enumerate(command)]
    flag = TAKES_A_MODEL.get(out[0], "absent")
    if flag == "absent":
        return out
    if flag is None and (len(out) == 1 or out[1].startswith("--")):     # info's positional model
        return [out[0], tiny, *out[1:]]
    return out if flag is None or flag in out else out + [flag, tiny]


def test_the_tour_commands_are_all_found_and_their_elisions_resolve():
    commands = tour_commands()
    assert [c[0] for c in commands[:2]] == ["info", "info"] and len(commands) >= 20
    earlier: list[list[str]] = []
    for command in commands:
        expand(command, earlier)
        earlier.append(command)


@pytest.mark.integration
def test_the_readme_tour_runs_top_to_bottom(tmp_path, shared_data):
    """Every command of the tour, in order, from one working folder with ../shared beside it: a
    command runs (exit 0), its `...` values filled in; a variation written `llmprune CMD ...` is
    parsed and its settings validated as the CLI does (it names files the README leaves to the
    reader, such as a fleet file)."""
    from llmprune.testing import tiny_checkpoint

    from .conftest import run_main

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    tiny = str(tiny_checkpoint(tmp_path / "tiny", "llama", max_position_embeddings=1024))
    earlier: list[list[str]] = []
    for written in tour_commands():
        command, elided = expand(written, earlier)
        earlier.append(written)
        command = on_tiny(command, tiny)
        if elided:
            check_parses(command)
            continue
        done = run_main(*command, cwd=work)          # in this process: no interpreter start per command
        assert done.returncode == 0, f"llmprune {' '.join(command)}\n{done.stderr[-3000:]}"
        if command[0] == "export":    # its summary: each variant's size and quality, then time, peak RSS, where
            last = done.stdout.strip().splitlines()[-1]
            assert re.fullmatch(r"\d+ s, peak RSS \d+ MiB -> (onnx|gguf)/?", last), done.stdout
            expected = ["read back"] if "gguf" in command else ["bits/byte", "of fp32"]
            assert all(word in done.stdout for word in expected), done.stdout
    assert (work / "onnx" / "int4").is_dir() and (work / "recovered" / "metrics.json").is_file()
    assert (work / "gguf" / "model-f16.gguf").is_file()


def check_parses(command: list[str]) -> None:
    """The command's flags parsed and its settings validated, as `llmprune` does before running."""
    from llmprune.cli import compress as compress_cmd
    from llmprune.cli import recover as recover_cmd
    from llmprune.cli.main import build_parser

    args = build_parser().parse_args(command)
    validate = {"compress": compress_cmd.build_config, "recover": recover_cmd.config_from_flags}.get(command[0])
    if validate is not None:
        validate(args)


def docs_commands() -> list[tuple[str, list[str]]]:
    """(file, arguments) of every `llmprune` command in the ```bash blocks of docs/*.md."""
    import shlex

    found = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^(\.venv/bin/|\$ )", "", line.strip())
                if line.startswith("llmprune "):
                    found.append((page.name, shlex.split(line, comments=True)[1:]))
    return found


def test_every_command_in_the_docs_parses_and_its_settings_hold():
    """The docs' commands name flags that exist, with values and combinations the CLI accepts (the
    tour test runs the README's; these name the real model, a fleet or files a test cannot have)."""
    commands = docs_commands()
    assert len(commands) >= 15 and {page for page, _ in commands} >= {"cli.md", "compress.md", "recover.md"}
    earlier: dict[str, list[list[str]]] = {}
    for page, written in commands:
        command, _ = expand(written, earlier.setdefault(page, []))
        earlier[page].append(written)
        try:
            check_parses(command)
        except SystemExit:
            pytest.fail(f"docs/{page}: llmprune {' '.join(written)} does not parse")


# ---------------------------------------------------------------- numbers quoted in README and docs
RESULTS = REPO / "bench" / "results"
# Figures written by hand in README.md and docs/ must be measured ones: every decimal number with at
# least 3 significant digits is looked up in bench/results/*.json (as written, as a percentage, or
# rounded to the digits shown). docs/benchmarks.md is written by the benchmarks themselves.
NOT_FIGURES = {
    ("README.md", "3.10"): "a Python version",
    ("docs/models.md", "4.57"): "a transformers version",
    ("docs/compress.md", "0.999"): "a --vocab setting in an example",
    ("docs/recover.md", "60.0"): "a default in a code example",
    ("docs/export.md", "212.4"): "the shape of a log line",
} | {(page, version): "a transformers version"
     for page in ("README.md", "docs/export.md") for version in ("4.57", "4.58", "5.24", "5.25")}
# Sections that are their own record: a one-off study no benchmark regenerates (its numbers are not
# in bench/results); the reason is shown in the page itself.
STUDIES = {("docs/export.md", "## int4 and int8 on Gemma-3-270M: what was measured")}


def measured_numbers() -> list[float]:
    found: list[float] = []

    def walk(x) -> None:
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            found.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            found.extend(float(m) for m in re.findall(r"\d+\.\d+|\d+", x))

    import json

    for path in sorted(RESULTS.glob("*.json")):
        walk(json.loads(path.read_text()))
    return found


def quoted_figures() -> list[tuple[str, str, str]]:
    """(page, number, line) of each figure written in README.md and docs/*.md."""
    pages = [README] + [p for p in sorted((REPO / "docs").glob("*.md")) if p.name != "benchmarks.md"]
    out = []
    for page in pages:
        name = str(page.relative_to(REPO))
        text = page.read_text(encoding="utf-8")
        for heading in [h for p, h in STUDIES if p == name]:
            start = text.index(heading)
            end = text.find("\n## ", start + len(heading))
            text = text[:start] + (text[end:] if end != -1 else "")
        for line in text.splitlines():
            for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", line):
                if len(number.replace(".", "").lstrip("0")) >= 3 and (name, number) not in NOT_FIGURES:
                    out.append((name, number, line.strip()))
    return out


def is_measured(number: str, measured: list[float]) -> bool:
    digits = len(number.split(".")[1])
    quoted = float(number)
    return any(abs(round(v * scale, digits) - quoted) < 0.5 * 10**-digits + 1e-12
               for v in measured for scale in (1.0, 100.0))


def test_every_figure_quoted_in_the_readme_and_docs_is_a_measured_one():
    measured = measured_numbers()
    figures = quoted_figures()
    assert len(figures) > 10
    missing = [f"{page}: {number} in '{line[:120]}'" for page, number, line in figures if not is_measured(number, measured)]
    assert not missing, "figures not found in bench/results:\n" + "\n".join(missing)


def test_the_figure_check_fails_on_a_figure_nobody_measured():
    measured = measured_numbers()
    assert is_measured("38.90", measured)            # comp@0.2 on WikiText-2 (bench/results/compress.json)
    assert not is_measured("38.91", measured) and not is_measured("57.8", measured)
