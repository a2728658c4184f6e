"""The test suite's own layout: helpers live in tests/_helpers, and no test module imports
another test module (test_*) or conftest.py, whether in its own code or in the source of a
worker script it writes (a string run in a subprocess with tests/ on sys.path)."""

import ast
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _forbidden(module: str) -> str | None:
    """The part of a dotted module name that is a test module or conftest, if any."""
    return next((p for p in module.split(".") if p == "conftest" or p.startswith("test_")), None)


def _imports(tree: ast.AST):
    """(line, module) of every import in `tree`: `import a.b` gives a.b, `from a import b`
    gives a and a.b (so `from . import test_x` and `from pkg import conftest` count too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if base:
                yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if base else alias.name
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, str(node.args[0].value)


def _carried(tree: ast.AST):
    """(line, module) of every import in the Python that string constants of `tree` carry: the
    whole string parsed, or (a template with {placeholders}) each import line of it alone."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value):
            continue
        text = textwrap.dedent(node.value.replace("{{", "{").replace("}}", "}"))
        try:
            yield from ((node.lineno + line - 1, mod) for line, mod in _imports(ast.parse(text)))
        except SyntaxError:
            for i, line in enumerate(text.splitlines()):
                if line.lstrip().startswith(("import ", "from ")):
                    try:
                        yield from ((node.lineno + i, mod) for _, mod in _imports(ast.parse(line.strip())))
                    except SyntaxError:
                        continue


def cross_imports(source: str, name: str = "<source>", strings: bool = True) -> list[str]:
    """Every import of a test module or of conftest in `source` (its own code and, with
    `strings`, the Python it carries as strings), as 'name:line: module'."""
    tree = ast.parse(source, name)
    found = {(line, _forbidden(mod)) for line, mod in [*_imports(tree), *(_carried(tree) if strings else [])]
             if _forbidden(mod)}
    return [f"{name}:{line}: {mod}" for line, mod in sorted(found)]


def test_no_test_module_imports_another_test_module_or_conftest():
    files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "_helpers").glob("*.py"))
    assert (TESTS / "test_test_layout.py") in files and (TESTS / "_helpers" / "__init__.py") in files
    # This module's strings are the fake sources below: its own code is checked, not them.
    bad = [hit for f in files
           for hit in cross_imports(f.read_text(), f.relative_to(TESTS).as_posix(), strings=f.name != "test_test_layout.py")]
    assert not bad, "import helpers from tests/_helpers instead:\n" + "\n".join(bad)


def test_the_helper_modules_stand_alone():
    """Nothing but the helper package and test modules sits in tests/ (conftest.py holds fixtures only)."""
    loose = sorted(f.name for f in TESTS.glob("*.py") if not f.name.startswith("test_") and f.name != "conftest.py")
    assert not loose, f"helper modules belong in tests/_helpers: {loose}"
    conftest = ast.parse((TESTS / "conftest.py").read_text())
    defs = [n for n in conftest.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs, "conftest.py defines the fixtures"
    for node in defs:
        decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
        assert any(d.startswith(("pytest.fixture", "fixture")) for d in decorators), \
            f"conftest.py:{node.lineno}: {node.name} is not a fixture (helpers belong in tests/_helpers)"
    assigns = [n for n in conftest.body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    assert not assigns, f"conftest.py:{assigns[0].lineno}: constants belong in tests/_helpers"


@pytest.mark.parametrize("source,want", [
    ("from conftest import LLAMA\n", ["<source>:1: conftest"]),
    ("import conftest\n", ["<source>:1: conftest"]),
    ("import os\nfrom test_reference import make_case\n", ["<source>:2: test_reference"]),
    ("import test_stages as ts\n", ["<source>:1: test_stages"]),
    ("def f():\n    from test_grouping import split_merge_case\n", ["<source>:2: test_grouping"]),
    ("from . import test_x\n", ["<source>:1: test_x"]),
    ("import importlib\nm = importlib.import_module('test_plan')\n", ["<source>:2: test_plan"]),
    ("W = '''\nimport sys\nfrom test_distributed import batch_at, CFG\nx = {{1: 2}}\n'''\n", ["<source>:3: test_distributed"]),
    ("W = textwrap.dedent(\"\"\"\n    import sys\n    sys.path.insert(0, {tests!r})\n    from conftest import LLAMA\n\"\"\")\n",
     ["<source>:4: conftest"]),
    ("from _helpers.models import LLAMA\nfrom _helpers.cases import make_case\nimport torch\n", []),
    ("import testing\nfrom pytest import fixture\nS = 'not python: import ('\n", []),
])
def test_the_check_finds_what_it_must(source, want):
    """The check can fail: fed a fake module, it names each forbidden import and nothing else."""
    assert cross_imports(source) == want
