"""The repository carries its own design: every `docs/DESIGN.md#anchor` a file cites exists,
and no tracked file names a document outside the repository."""

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
