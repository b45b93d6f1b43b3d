"""Records from the embedded generator, local JSONL/Parquet files, or HF datasets by name.

A record becomes a `(prompt, answer)` pair through field names or format templates. Loading is
separate from tokenisation (`tcp.data.collate`) so the same records feed training and evaluation.
"""

from __future__ import annotations

import os
from typing import Any

from tcp.config import DataConfig
from tcp.data import arithmetic

Record = dict[str, str]


def _to_pair(rec: dict[str, Any], cfg: DataConfig, *, where: str, index: int) -> Record:
    try:
        prompt = (cfg.prompt_template.format(**rec) if cfg.prompt_template
                  else rec[cfg.prompt_field])
        answer = (cfg.answer_template.format(**rec) if cfg.answer_template
                  else rec[cfg.answer_field])
    except KeyError as e:
        raise ValueError(
            f"{where} record {index}: field {e} not found (fields: {sorted(rec)}); set "
            "data.prompt_field/data.answer_field or data.prompt_template/data.answer_template"
        ) from None
    prompt, answer = str(prompt), str(answer)
    if not answer.strip():
        raise ValueError(
            f"{where} record {index}: empty answer (field {cfg.answer_field!r}); every sample "
            "needs a non-empty answer because the loss is computed on answer tokens only"
        )
    return {"prompt": prompt, "answer": answer}


def _load_files(path: str, fmt: str) -> list[dict[str, Any]]:
    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=path,
                               split="train")
    return list(ds)


def _load_hf(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub raises many types; users need one clear message
        raise RuntimeError(
            f"could not load HF dataset {name!r} (config={config!r}, split={split!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without network "
            "access, download it once elsewhere into the HF cache, or export it to JSONL and use "
            "data.source=jsonl."
        ) from e
    return list(ds)


def load_split(cfg: DataConfig, split: str, *, seed: int) -> list[Record]:
    """Records of `split` ('train' | 'validation' | 'test')."""
    if cfg.source == "arithmetic":
        size = {"train": cfg.train_size, "validation": cfg.val_size, "test": cfg.test_size}[split]
        return [{"prompt": r["prompt"], "answer": r["answer"]}
                for r in arithmetic.generate(seed, split, size)]
    if cfg.source == "hf":
        assert cfg.train_path is not None  # validated in DataConfig
        hf_split = {"train": cfg.hf_train_split, "validation": cfg.hf_val_split,
                    "test": cfg.hf_test_split}[split]
        raw = _load_hf(cfg.train_path, cfg.hf_config, hf_split)
        where = f"{cfg.train_path}[{hf_split}]"
    else:
        path = {"train": cfg.train_path, "validation": cfg.val_path, "test": cfg.test_path}[split]
        if path is None:
            key = {"validation": "val_path", "test": "test_path"}[split]
            raise ValueError(f"data.{key} is required for the {split} split")
        raw = _load_files(path, cfg.source)
        where = path
    return [_to_pair(r, cfg, where=where, index=i) for i, r in enumerate(raw)]
