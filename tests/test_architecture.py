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
# The places a stage runs another, both with compress's public API (docs/architecture.md): prune-tune
# prunes the global model between federated rounds; a fleet-chosen vocabulary is cut by compress's step.
COMPOSERS = {"llmprune.fedrecover.prune_tune", "llmprune.fedrecover.fleet_vocab"}


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


def _policy_names() -> set[str]:
    from llmprune.fedrecover.policies import POLICIES

    return set(POLICIES)


def _compared_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants a comparison tests against (`x == "bandit"`, `x in ("plan", "bandit")`)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            found += [(node.lineno, item.value) for item in items
                      if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return found


def test_no_policy_name_is_compared_outside_the_policies_package():
    """A policy is a plug-in: only fedrecover/policies/ may ask which policy is running (by name or
    by isinstance of a policy class); everything else reads the hooks and declared attributes."""
    names = _policy_names()
    classes = {"PlanPolicy", "SubmodelPolicy", "BanditPolicy", "StagePolicy", "PruneTunePolicy", "PlanConfig",
               "SubmodelConfig", "BanditConfig", "DevftConfig", "PruneTuneConfig"}
    bad = []
    for module, path in MODULES.items():
        if module.startswith("llmprune.fedrecover.policies"):
            continue
        tree = ast.parse(path.read_text())
        bad += [f"{module}:{line} compares {value!r}" for line, value in _compared_constants(tree) if value in names]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
                used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
                bad += [f"{module}:{node.lineno} tests isinstance of {c}" for c in used & classes]
    assert not bad, "; ".join(bad)


def test_every_policy_is_one_module_registered_by_one_line():
    from llmprune.fedrecover.policies import POLICIES

    registry = (ROOT / "fedrecover" / "policies" / "__init__.py").read_text()
    for name, cls in POLICIES.items():
        module = cls.__module__.rsplit(".", 1)[-1]
        assert cls.__module__ == f"llmprune.fedrecover.policies.{module}", name
        assert registry.count(f'_register("{module}")') == 1, name
        assert (ROOT / "fedrecover" / "policies" / f"{module}.py").is_file()
