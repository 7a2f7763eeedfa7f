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
