"""The sibling paths tcp-log reserves beside a log `<PATH>` while it rewrites it.

    <PATH>.tcp-compact/     the new store being written (and, after an exchange, the old one)
    <PATH>.tcp-old/         the old store during the rename fallback of the swap
    <PATH>.tcp-swap.json    the recovery marker of the rename fallback
"""

from __future__ import annotations

from pathlib import Path

TEMP_TAG = ".tcp-log-temp"
"""A file marking a folder as tcp-log's partial copy (safe to delete)."""


def temp_path(path: Path) -> Path:
    """Where the new store is written."""
    return path.with_name(path.name + ".tcp-compact")


def old_path(path: Path) -> Path:
    """Where the old store waits during the rename fallback."""
    return path.with_name(path.name + ".tcp-old")


def marker_path(path: Path) -> Path:
    """The rename fallback's recovery marker."""
    return path.with_name(path.name + ".tcp-swap.json")
