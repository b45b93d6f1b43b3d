"""Every commit makes what it changed durable: each file renamed in has its folder fsynced, and
each folder created has its parent fsynced, while folders already durably linked are not
fsynced again (fewer fsyncs per commit)."""

import os
from pathlib import Path

from tcp.config import ZarrStoreConfig
from tcp.mistake_log import format as fmt
from tcp.mistake_log.format import Schema
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries

SMALL = 64 * 16 * 4 / 2**20  # 64-row chunks at d=16 float32: new chunk folders every few steps


def snapshot(root: Path) -> tuple[dict[Path, int], set[Path]]:
    files, dirs = {}, set()
    for d, _, names in os.walk(root):
        dirs.add(Path(d))
        for n in names:
            files[Path(d) / n] = os.stat(Path(d) / n).st_ino
    return files, dirs


def test_each_commit_fsyncs_every_folder_it_changed_and_no_linked_parent(tmp_path, monkeypatch):
    calls = []
    real = fmt.fsync_all

    def record(files, dirs):
        dirs = set(dirs)
        calls.append(dirs)
        real(files, dirs)

    monkeypatch.setattr(fmt, "fsync_all", record)
    root = tmp_path / "log"
    w = RankStoreWriter(root, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    parents_skipped = 0
    for step in range(12):
        files0, dirs0 = snapshot(root)
        w.append(fake_entries(step, n=6))
        calls.clear()
        w.commit()
        files1, dirs1 = snapshot(root)
        synced = set().union(*calls)
        changed = {p for p, ino in files1.items()
                   if files0.get(p) != ino and p.name != "manifest.json"}  # manifest: own fsync
        assert changed, "a commit renames files in"
        for p in changed:
            assert p.parent in synced, f"step {step}: {p} renamed in, its folder not fsynced"
        for d in dirs1 - dirs0:
            assert d.parent in synced, f"step {step}: {d} created, its parent not fsynced"
        if step:
            # the saving: the chunk-row folders' parent `c` of a 2-D array is fsynced only
            # when a chunk-row folder was created under it
            c = root / "rank00000" / "x_tilde" / "c"
            parents_skipped += c not in synced and not any(d.parent == c for d in dirs1 - dirs0)
            assert (c in synced) == any(d.parent == c for d in dirs1 - dirs0)
    assert parents_skipped > 0
