"""The repository carries its own design: every citation of a section of docs/DESIGN.md
exists, no tracked file names a document outside the repository, and README's Layout
matches the tree."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
CITE = re.compile(r"docs/DESIGN\.md#([A-Za-z0-9_-]+)")
# spelled in pieces, so that this file does not name them itself
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", r"\b" + "SPEC" + r"\.md\b", r"/work/" + "main")]


def _tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in names:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".cu", ".cuh", ".cpp", ".h", ".json") \
                or name == ".ci/run":
            if path.is_file():
                yield name, path.read_text(encoding="utf-8", errors="replace")


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"></a>', DESIGN.read_text()))


def test_every_design_citation_resolves():
    anchors = _anchors()
    assert {"math", "backends", "auto", "plan", "pipeline", "gate"} <= anchors  # the five subjects
    cited = {}
    for name, text in _tracked_text_files():
        for anchor in CITE.findall(text):
            cited.setdefault(anchor, []).append(name)
    assert len(cited) >= 5, "the modules cite the design document"
    missing = {a: files for a, files in cited.items() if a not in anchors}
    assert not missing, f"citations of anchors that docs/DESIGN.md does not have: {missing}"


def test_no_file_names_a_document_outside_the_repository():
    found = [(name, p.pattern) for name, text in _tracked_text_files() for p in OUTSIDE if p.search(text)]
    assert not found, found


@pytest.mark.parametrize("text,bad", [("see ../" + "shared/docs/x.md", True), ("the " + "SPEC" + ".md", True),
                                       ("docs/DESIGN.md#math", False)])
def test_the_outside_check_can_fail(text, bad):
    assert any(p.search(text) for p in OUTSIDE) == bad


def _layout() -> dict[str, str]:
    """README's Layout block: {directory or file at the start of a line: the text that describes it}."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries, current = {}, None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current, _, rest = line.partition(" ")
            entries[current] = rest
        else:
            entries[current] += " " + line.strip()
    return entries


def test_readme_layout_matches_the_tree():
    entries = _layout()
    for head, text in entries.items():
        assert (ROOT / head).exists(), f"README's Layout names {head}, which is not in the tree"
        if head.endswith("/"):
            for name in re.findall(r"\b([a-z_][a-z0-9_]*\.(?:py|md|sh))\b", text):
                where = [ROOT / head / name, ROOT / head / "data" / name, ROOT / name]
                assert any(p.exists() for p in where), f"README's Layout says {head} holds {name}"
    # every module of the library, the wings and the kernels is in it
    for package in ("proper", "proper/train", "proper/train/data", "proper/apps", "proper/apps/bench",
                    "proper_kernels"):
        head = package + "/" if package + "/" in entries else package.rsplit("/", 1)[0] + "/"
        text = entries[head]
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            assert path.name in text, f"{path.relative_to(ROOT)} is missing from README's Layout"
