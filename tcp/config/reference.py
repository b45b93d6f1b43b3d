"""The configuration reference (docs/config.md), generated from the config dataclasses: every
key with its type, its default, the value configs/default.yaml gives it where that differs, and
its documentation (the docstring under the field). `tools/gen_config_doc.py` writes it; a test
checks that the file is current."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from tcp.config.run import RunConfig, _read_yaml
from tcp.config.schema import from_dict, to_dict

HEADER = """\
# Configuration reference

Every key of a run config, generated from the config dataclasses in `tcp/config/` by
`python tools/gen_config_doc.py` (a test fails when this file is out of date). How config files,
`extends` and `key=value` overrides work: [configuration.md](configuration.md).

*default* is what a key is when no config file sets it. `launcher/train.py` without `--config`
runs `configs/default.yaml`, which sets some keys otherwise: its value is in the
*configs/default.yaml* column where it differs.
"""


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation as written, docstring)} of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out: dict[str, tuple[str, str]] = {}
    body = node.body
    for stmt, nxt in zip(body, [*body[1:], None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())
            out[stmt.target.id] = (ast.unparse(stmt.annotation), doc)
    return out


def _value(v: Any) -> str:
    """A value as it is written in YAML (one line)."""
    return json.dumps(v) if v is None or isinstance(v, bool | list | dict) else \
        yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str, defaults: dict[str, Any], shipped: dict[str, Any],
          sections: list[str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], key))
            continue
        ann, doc = docs[f.name]
        default, mine = defaults[f.name], shipped[f.name]
        other = "" if mine == default else f"`{_cell(_value(mine))}`"
        rows.append(f"| `{key}` | `{_cell(ann)}` | `{_cell(_value(default))}` | {other} | "
                    f"{_cell(doc)} |")
    if rows:
        where = Path(inspect.getfile(cls)).as_posix()
        where = where[where.rindex("tcp/config/"):]
        title = f"`{prefix[:-1]}`" if prefix else "top level"
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        sections.append("\n".join([
            f"## {title}", "", f"{summary} (`{cls.__name__}`, {where})", "",
            "| key | type | default | configs/default.yaml | |", "|---|---|---|---|---|", *rows,
        ]))
    for sub, key in nested:
        _rows(sub, f"{key}.", defaults[key.rsplit('.', 1)[-1]],
              shipped[key.rsplit('.', 1)[-1]], sections)
    return sections


def render_reference(default_yaml: Path) -> str:
    """docs/config.md, from the dataclasses and `default_yaml` (configs/default.yaml)."""
    shipped = to_dict(from_dict(RunConfig, _read_yaml(default_yaml)))
    sections = _rows(RunConfig, "", to_dict(RunConfig()), shipped, [])
    return HEADER + "\n" + "\n\n".join(sections) + "\n"
