"""The layout contract of docs/architecture.md: every module has its line there, tcp/'s top level
holds only the public API and the error types, kernels/ stands alone, files stay readable. (The
layers themselves are checked by `lint-imports`, contracts in pyproject.toml.)"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 400
"""A file a reader can hold in mind (the house style); split a module past it."""


def _modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for folder in ("tcp", "kernels")
            for p in (ROOT / folder).rglob("*.py")}


def test_architecture_doc_has_one_line_per_module():
    listed = re.findall(r"^- `((?:tcp|kernels)/[\w/]+\.py)` — \S", DOC.read_text(), re.M)
    assert len(listed) == len(set(listed)), "a module is listed twice in docs/architecture.md"
    missing = sorted(_modules() - set(listed))
    gone = sorted(set(listed) - _modules())
    assert not missing, f"add a line for each to docs/architecture.md: {missing}"
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"


def test_tcp_top_level_is_the_api_and_the_folders_by_role():
    modules = sorted(p.name for p in (ROOT / "tcp").glob("*.py"))
    assert modules == ["__init__.py", "errors.py"], \
        f"tcp/ keeps only __init__.py and errors.py; move {modules} into a folder by role"
    folders = sorted(p.name for p in (ROOT / "tcp").iterdir()
                     if p.is_dir() and (p / "__init__.py").exists())
    assert folders == ["cli", "config", "data", "evaluation", "log_tools", "mistake_log",
                       "models", "runtime", "training"]


def test_kernels_import_nothing_else_of_tcp():
    # import-linter cannot see kernels/ (installed under tcp/ by a package-dir mapping).
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not (name == "tcp" or name.startswith("tcp.")) \
                    or name.startswith("tcp.kernels"), f"{path.name} imports {name}"


def test_no_module_is_longer_than_a_reader_holds_in_mind():
    long = {m: n for m in sorted(_modules())
            if (n := len((ROOT / m).read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
