"""The import rule between the package's wings, checked by walking every module's imports
(top-level and inside functions alike):

    proper_kernels  never imports proper
    proper          (the library) never imports proper.train or proper.apps
    proper.train    never imports proper.apps
    none of them    imports benchmarks/ or tests/ (not installed with the package)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """Every module the source of module `name` imports, relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`
    return found


def _wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "proper_kernels":
        return "kernels"
    if parts[0] in ("benchmarks", "tests", "conftest", "_helpers") or parts[0].startswith("test_"):
        return "scripts"  # not installed with the package
    if parts[0] != "proper":
        return "outside"
    if len(parts) > 1 and parts[1] in ("train", "apps"):
        return parts[1]
    return "library"


# what each wing may not import
FORBIDDEN = {"kernels": {"library", "train", "apps", "scripts"}, "library": {"train", "apps", "scripts"},
             "train": {"apps", "scripts"}, "apps": {"scripts"}}


def _modules():
    for top in ("proper", "proper_kernels"):
        yield from sorted((ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_wing_imports_one_above_it(path):
    name = _module_name(path)
    assert not (bad := _forbidden(name, _imports(path))), f"{name} ({_wing(name)}) imports {bad}"


def _forbidden(name: str, imports: set[str]) -> list[str]:
    wing = _wing(name)
    bad = [m for m in imports if _wing(m) in FORBIDDEN[wing] and m != "proper"]
    if wing == "kernels" and "proper" in imports:  # the package itself is the library
        bad.append("proper")
    return sorted(bad)


@pytest.mark.parametrize("name,source,bad", [
    ("proper.io", "def f():\n    from .train.data import load_jsonl\n", ["proper.train.data",
                                                                          "proper.train.data.load_jsonl"]),
    ("proper.train.stages", "from ..apps import cli\n", ["proper.apps", "proper.apps.cli"]),
    ("proper.train.stages", "import proper.apps.bench\n", ["proper.apps.bench"]),
    ("proper_kernels.dispatch", "import proper\n", ["proper"]),
    ("proper.apps.cli", "from ..train import stages\nfrom .. import io\n", []),
    ("proper.apps.bench.main", "from benchmarks.goals import tensors\n", ["benchmarks.goals",
                                                                        "benchmarks.goals.tensors"]),
])
def test_the_walker_catches_each_kind_of_import(name, source, bad):
    # the check can fail: a lazy import, `from .. import x`, an absolute one, the bare package
    assert _forbidden(name, _imports_of(source, name, False)) == bad


def test_every_wing_says_who_may_import_it():
    for init in ("proper/train/__init__.py", "proper/apps/__init__.py", "proper/__init__.py",
                 "proper_kernels/__init__.py"):
        doc = ast.get_docstring(ast.parse((ROOT / init).read_text())) or ""
        assert "import" in doc and ("never" in doc or "nothing" in doc), init


MAX_LINES = 420  # "about 400"


@pytest.mark.parametrize("path", sorted((ROOT / "proper").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_long_unless_it_says_why(path):
    lines = path.read_text().count("\n")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "one story" in doc, f"{path.relative_to(ROOT)}: {lines} lines"
