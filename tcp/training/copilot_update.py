"""The Copilot's update, shared by joint training, the Copilot tail and offline training: the
step's entries joined with the replayed ones on the compute device, then one RMSE step of the
Copilot's engine (docs/method.md §5)."""

from __future__ import annotations

from typing import Any

import torch

from tcp.config import KernelsConfig, MistakeLogConfig
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.record import MistakeBatch
from tcp.models.copilot import ErrorTarget
from tcp.models.copilot_inputs import build_inputs


def copilot_entries(current: MistakeBatch, log: MistakeLog, *, step: int,
                    cfg: MistakeLogConfig, device: torch.device) -> MistakeBatch | None:
    """The Copilot's training entries at `step`: the current step's (on the compute device) and
    those replayed from the log (read on the host), joined on `device`; None when there are
    none yet. Replayed data enters the compute path here and nowhere else."""
    return join_entries(current, log.sample(step=step, num=cfg.replay_size),
                        include_current=cfg.include_current, device=device)


def join_entries(current: MistakeBatch | None, replay: MistakeBatch | None, *,
                 include_current: bool, device: torch.device) -> MistakeBatch | None:
    """The step's own entries (when `include_current` and there are any) followed by the
    replayed ones, on `device`; None when there are none. Joint and offline training
    (tcp.training.offline_job) both build the Copilot's batch here."""
    own = include_current and current is not None and current.num_entries > 0
    parts = [p for p in (current if own else None, replay) if p is not None]
    return MistakeBatch.cat(parts, device=device) if parts else None


def copilot_update(copilot: Any, entries: MistakeBatch, *, kernels: KernelsConfig,
                   device: torch.device) -> tuple[float, float]:
    """One step of the Copilot's engine on `entries`: RMSE loss against the sparse errors
    (docs/method.md §5), backward, step; returns (loss, the zero baseline's RMSE). Collective."""
    inputs = build_inputs(entries, device)
    target = ErrorTarget.from_batch(entries, device, fused=kernels.fused, impl=kernels.impl,
                                    chunk_mib=kernels.chunk_mib)
    loss, zero = copilot(inputs, target=target)  # fused: f is never materialised
    copilot.backward(loss)
    copilot.step()
    return float(loss.detach()), float(zero)


