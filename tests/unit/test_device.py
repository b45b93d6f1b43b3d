"""Tensors meet on one device by construction (issue: the joint loop crashed on a GPU at its
first replay step). Without a GPU, the current step's entries are put on the `meta` device:
anything that joins them with host-side replayed entries before moving them raises, exactly as a
CUDA/CPU mix does on a GPU."""

from __future__ import annotations

import torch

from tcp.config import MistakeLogConfig, ZarrStoreConfig
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import Schema, create_root
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.record import MistakeBatch
from tcp.training.copilot_update import copilot_entries
from tests.helpers import fake_entries

META = torch.device("meta")


def _fields_on(batch: MistakeBatch, device: torch.device) -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(batch) if getattr(batch, f.name).device != device]


def test_cat_moves_every_part_to_the_compute_device() -> None:
    host = fake_entries(0)
    cur = fake_entries(1).to(META)
    out = MistakeBatch.cat([cur, host], device=META)
    assert _fields_on(out, META) == []
    assert out.h.shape[0] == cur.h.shape[0] + host.h.shape[0]
    assert out.y_offsets.shape[0] == cur.num_entries + host.num_entries + 1


def test_replay_from_memory_log_joins_on_compute_device() -> None:
    log = MemoryMistakeLog(window_steps=8, seed=0, rank=0)
    for s in range(3):
        log.append(fake_entries(s))
    cfg = MistakeLogConfig(backend="memory", replay_size=4, include_current=True)
    cur = fake_entries(3).to(META)  # the current step's entries, on the "GPU"
    out = copilot_entries(cur, log, step=3, cfg=cfg, device=META)
    assert out is not None and _fields_on(out, META) == []
    assert out.num_entries == cur.num_entries + 4


def test_replay_from_zarr_store_joins_on_compute_device(tmp_path) -> None:
    schema = Schema(16, 3, "float32")
    create_root(tmp_path, schema)
    store = ZarrStoreConfig(fsync=False, replay_lag_steps=1)
    log = ZarrMistakeLog(tmp_path, rank=0, cfg=store, schema=schema, window_steps=8,
                         replay_size=4, seed=0)
    try:
        for s in range(3):
            log.append(fake_entries(s))
        cfg = MistakeLogConfig(replay_size=4, include_current=True, store=store)
        cur = fake_entries(3).to(META)
        out = copilot_entries(cur, log, step=3, cfg=cfg, device=META)
        assert out is not None and _fields_on(out, META) == []
        assert out.num_entries == cur.num_entries + 4
        # Replay only (include_current false): the host-side read still lands on the device.
        only = copilot_entries(cur, log, step=3, cfg=MistakeLogConfig(
            replay_size=4, include_current=False, store=store), device=META)
        assert only is not None and _fields_on(only, META) == []
    finally:
        log.close()
