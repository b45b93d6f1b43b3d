"""Records from the embedded generator, local JSONL/Parquet files, or HF datasets by name.

A record becomes a `(prompt, answer)` pair through field names or format templates. Loading is
separate from tokenisation (`tcp.data.collate`) so the same records feed training and evaluation.

Every problem with the data is a `DataError` (one line, exit 2, before any model loads) that
names where it is: `file:line` for JSONL (lines count from 1, as editors do), `file row i` for
Parquet and HF datasets (rows count from 0, as `dataset[i]` does), and the field. No record ever
becomes a stringified `None`: a missing or null field is an error, and so is an empty prompt or
answer. Fields a template uses may be empty strings (e.g. an optional "input" column).
"""

from __future__ import annotations

import json
import os
import string
from typing import Any

from tcp.config import DataConfig
from tcp.config.data import BUILTIN
from tcp.data import families
from tcp.errors import RunError

Record = dict[str, str]


class DataError(RunError):
    """The data cannot be used as it is; the message names the file, line or row, and field."""

    kind = "data"


def load_split(cfg: DataConfig, split: str, *, seed: int) -> list[Record]:
    """Records of `split` ('train' | 'validation' | 'test')."""
    return load_split_located(cfg, split, seed=seed)[0]


def load_split_located(cfg: DataConfig, split: str, *,
                       seed: int) -> tuple[list[Record], list[str]]:
    """Records of `split` and where each came from ('file:line', 'file row i'), so a later
    check (over-long, unknown tokens) can name the sample."""
    rows: list[tuple[str, dict[str, Any]]]
    if cfg.source in BUILTIN:
        # Generated records take the user-data path below (fields or templates, the same checks).
        size = {"train": cfg.train_size, "validation": cfg.val_size, "test": cfg.test_size}[split]
        try:
            raw = families.generate(cfg.source, seed, split, size)
        except ValueError as e:
            raise DataError(str(e)) from None
        rows = [(f"{cfg.source} {split} row {i}", r) for i, r in enumerate(raw)]
    elif cfg.source == "hf":
        assert cfg.train_path is not None  # validated in DataConfig
        hf_split = {"train": cfg.hf_train_split, "validation": cfg.hf_val_split,
                    "test": cfg.hf_test_split}[split]
        raw = _load_hf(cfg.train_path, cfg.hf_config, hf_split)
        name = f"{cfg.train_path}[{hf_split}]"
        if not raw:
            raise DataError(f"{name}: no rows; set data.hf_{_split_key(split)}_split to a "
                            "non-empty split")
        rows = [(f"{name} row {i}", r) for i, r in enumerate(raw)]
    else:
        key = {"train": "train_path", "validation": "val_path", "test": "test_path"}[split]
        path = getattr(cfg, key)
        if path is None:
            raise DataError(f"data.{key} is required for the {split} split with "
                            f"data.source={cfg.source}; set data.{key}=/path/{split}.{cfg.source}")
        if not os.path.isfile(path):
            raise DataError(f"data.{key}: file not found: {path}; fix the path")
        rows = _read_jsonl(path) if cfg.source == "jsonl" else _read_parquet(path)
        if not rows:
            raise DataError(f"{path}: no records (the file is empty); point data.{key} at a "
                            f"file with the {split} split")
    prompt_fields = _template_fields(cfg.prompt_template, "prompt_template")
    answer_fields = _template_fields(cfg.answer_template, "answer_template")
    recs = [to_pair(r, cfg, where=w, fields=(prompt_fields, answer_fields)) for w, r in rows]
    return recs, [w for w, _ in rows]


def _split_key(split: str) -> str:
    return {"train": "train", "validation": "val", "test": "test"}[split]


def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """One JSON object per line (blank lines skipped), each with its 'path:line'. Read here, not
    with `datasets`, because that fills a field a row lacks with None (which then trained as
    the text "None") and reports bad JSON or bytes without a line number."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); re-encode the file as UTF-8, e.g. "
                                f"`iconv -f latin1 -t utf-8`") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = (" (this looks like a JSON array: convert it with `jq -c '.[]'`)"
                        if not rows and line.lstrip().startswith("[") else "")
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}; "
                                "JSONL needs one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object {{...}}, got "
                                f"{type(row).__name__}; JSONL needs one JSON object per line")
            rows.append((where, row))
    return rows


def _read_parquet(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Parquet file, each with its 'path row i'."""
    import pyarrow as pa  # optional: Parquet only
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check data.source and "
                        "the path") from None
    return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def _load_hf(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets  # heavy: only for data.source=hf

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub raises many types; users need one clear message
        raise DataError(
            f"could not load HF dataset {name!r} (config={config!r}, split={split!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without network "
            "access, download it once elsewhere into the HF cache, or export it to JSONL and use "
            "data.source=jsonl."
        ) from None
    return list(ds)


def _template_fields(template: str | None, key: str) -> list[str]:
    """The record fields `template` refers to (checked once per split, not per row)."""
    if template is None:
        return []
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"data.{key} is not a valid format string ({e}); write fields as "
                        "{name} and a literal brace as {{ or }}") from None
    out = []
    for f in names:
        base = f.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise DataError(f"data.{key} has a positional field {{{f}}}; name the record "
                            "field, e.g. {question}")
        out.append(base)
    return out


def to_pair(rec: dict[str, Any], cfg: DataConfig, *, where: str,
            fields: tuple[list[str], list[str]] | None = None) -> Record:
    """`rec` as {'prompt', 'answer'} (DataError naming `where` and the field when it cannot be).
    `fields`: the fields the prompt and answer templates use, when already parsed."""
    if fields is None:
        fields = (_template_fields(cfg.prompt_template, "prompt_template"),
                  _template_fields(cfg.answer_template, "answer_template"))
    prompt = _build(rec, "prompt", cfg.prompt_template, cfg.prompt_field, fields[0], where)
    answer = _build(rec, "answer", cfg.answer_template, cfg.answer_field, fields[1], where)
    return {"prompt": prompt, "answer": answer}


def _build(rec: dict[str, Any], part: str, template: str | None, field: str, used: list[str],
           where: str) -> str:
    """The prompt or answer (`part`) of `rec`, from its template or its field."""
    have = ", ".join(sorted(rec)) or "none"
    if template is None:
        if field not in rec:
            raise DataError(f"{where}: no field {field!r} (the row has: {have}); set "
                            f"data.{part}_field to the field holding the {part}, or "
                            f"data.{part}_template")
        value = rec[field]
        if value is None:
            raise DataError(f"{where}: field {field!r} ({part}) is null; fill it in or remove "
                            "the row")
        if not isinstance(value, str | int | float):
            raise DataError(f"{where}: field {field!r} ({part}) is a {type(value).__name__}, "
                            f"not text; pick a text field or format it with "
                            f"data.{part}_template")
        text = str(value)
        source = f"field {field!r}"
    else:
        for f in used:
            if f not in rec:
                raise DataError(f"{where}: data.{part}_template uses {{{f}}}, which the row "
                                f"does not have (it has: {have}); fix the template's field "
                                "names")
            if rec[f] is None:
                raise DataError(f"{where}: field {f!r} (used by data.{part}_template) is null; "
                                "fill it in or remove the row")
        try:
            text = template.format(**rec)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{where}: data.{part}_template cannot be filled from this row "
                            f"({type(e).__name__}: {e}); fix the template") from None
        source = f"data.{part}_template"
    if not text.strip():
        why = " (the loss is on answer tokens only)" if part == "answer" else ""
        raise DataError(f"{where}: empty {part} ({source}); every sample needs a non-empty "
                        f"{part}{why}: fill it in or remove the row")
    return text
