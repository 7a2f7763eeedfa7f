"""The layout the architecture promises (docs/architecture.md), checked on the source:
stages depend on the root package only, never on each other; the root depends on no stage;
no module imports another that imports it back; no library function runs past 60 lines unless
a `# long function: why` comment stands right above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package name -> source folder (pyproject maps the stage folders into the package)
PACKAGES = {"llmprune": "llmprune", "llmprune.compress": "compress", "llmprune.fedrecover": "fedrecover",
            "llmprune.export": "export", "llmprune.cli": "cli"}
STAGES = ("llmprune.compress", "llmprune.fedrecover", "llmprune.export")
MAX_LINES = 60
# The one place a stage runs another: prune-tune prunes the global model between federated rounds
# with compress's public API (docs/architecture.md).
COMPOSERS = {"llmprune.fedrecover.prune_tune"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(module: str, path: Path) -> set[str]:
    """Every llmprune module this one imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module, path).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("llmprune")}


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


MODULES = _modules()
GRAPH = {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_stages_import_only_the_root_package_and_themselves():
    bad = []
    for module, deps in GRAPH.items():
        own = _stage(module)
        for dep in deps:
            other = _stage(dep)
            if module.startswith("llmprune.cli") or other is None or other == own:
                continue
            if module in COMPOSERS and dep.split(".")[:2] == ["llmprune", "compress"]:
                continue
            bad.append(f"{module} -> {dep}")
    assert not bad, "a stage imports another stage: " + ", ".join(sorted(bad))


def test_the_root_package_imports_no_stage():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if _stage(m) is None and not m.startswith("llmprune.cli")
           for d in deps if _stage(d) is not None or d.startswith("llmprune.cli")]
    assert not bad, ", ".join(sorted(bad))


def test_no_two_modules_import_each_other():
    def is_package(m: str) -> bool:
        return MODULES[m].name == "__init__.py"

    pairs = sorted({tuple(sorted((a, b))) for a, deps in GRAPH.items() for b in deps
                    if a in GRAPH.get(b, ()) and not is_package(a) and not is_package(b)})
    assert not pairs, f"import circles: {pairs}"


def _long_functions() -> list[str]:
    out = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > MAX_LINES and not above.startswith("# long function:"):
                out.append(f"{module}.{node.name} ({length} lines)")
    return out


def test_no_long_function_without_a_reason():
    assert not _long_functions()


@pytest.mark.parametrize("module", ["llmprune.checkpoint", "llmprune.options"])
def test_the_shared_format_lives_in_the_root_package(module):
    assert module in MODULES
