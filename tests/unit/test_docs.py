"""The user's documents hold together: every relative link and `§` reference in README.md and
docs/ resolves, the configuration reference (docs/config.md) is current, and the README stays a
README (~200 lines; the rest lives in docs/)."""

import re
from pathlib import Path

import pytest

from tcp.config.reference import render_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
MD_FILE = re.compile(r"[\w./-]+\.md\b")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _text(doc: Path) -> str:
    """The document without its fenced code blocks (commands, not references)."""
    return FENCE.sub("", doc.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(doc: Path) -> list[str]:
    return [m[1] for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", _text(doc), re.M)]


def _target(doc: Path, ref: str) -> Path | None:
    """The file a relative reference in `doc` names: beside `doc`, else from the repository
    root (README-style paths such as docs/method.md written inside docs/)."""
    for base in (doc.parent, ROOT):
        if (base / ref).exists():
            return (base / ref).resolve()
    return None


def _section_numbers(doc: Path) -> set[str]:
    """Numbers that open a heading: "## 6. Fused decoding" -> 6, "### 5.3.1 Copilot tail" ->
    5.3.1."""
    return {h.split()[0].rstrip(".") for h in _headings(doc) if h[:1].isdigit()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for line_no, line in enumerate(_text(doc).splitlines(), 1):
        for link in LINK.findall(line):
            if re.match(r"[a-z]+:", link):
                continue  # a URL (http:, mailto:)
            path, _, anchor = link.partition("#")
            # A link resolves beside its document only (as on GitHub); a plain-text path in a §
            # reference may also be written from the repository root (_target).
            target = doc.resolve() if not path else \
                ((doc.parent / path).resolve() if (doc.parent / path).exists() else None)
            if target is None:
                broken.append(f"{doc.name}:{line_no}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and \
                    anchor not in {_slug(h) for h in _headings(target)}:
                broken.append(f"{doc.name}:{line_no}: {link} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_section_references_resolve(doc):
    """A `§N.M` refers to the markdown file named last before it on its line (a path or a link),
    else to docs/method.md; that file has a heading numbered N.M."""
    broken = []
    for line_no, line in enumerate(_text(doc).splitlines(), 1):
        for m in SECTION.finditer(line):
            named = MD_FILE.findall(line[:m.start()])
            target = _target(doc, named[-1]) if named else ROOT / "docs" / "method.md"
            if target is None or m[1].rstrip(".") not in _section_numbers(target):
                where = named[-1] if named else "docs/method.md"
                broken.append(f"{doc.name}:{line_no}: §{m[1]} (no such section in {where})")
    assert not broken, "\n".join(broken)


def test_config_reference_is_current():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == render_reference(ROOT / "configs" / "default.yaml"), \
        "docs/config.md is out of date: run python tools/gen_config_doc.py"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 220, f"README.md has {lines} lines; move detail into a guide under docs/"


def test_checker_sees_a_broken_reference(tmp_path):
    """The checks above can fail: a missing file, a missing heading and a missing section."""
    doc = tmp_path / "x.md"
    doc.write_text("# 1. Only\n[a](missing.md) [b](x.md#nope) see §2 and x.md §1\n")
    assert _target(doc, "missing.md") is None
    assert "nope" not in {_slug(h) for h in _headings(doc)}
    assert _section_numbers(doc) == {"1"}
    assert _slug("6.4 Choosing λ, and the test split") == "64-choosing-λ-and-the-test-split"
