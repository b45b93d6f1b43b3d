"""MistakeBatch layout and the in-memory log: window, determinism, exact resume."""

import pytest
import torch

from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.record import MistakeBatch
from tests.unit.test_copilot import random_batch


def step_batch(step, n=3, seed=0):
    b = random_batch([2 + i for i in range(n)], [1 + i for i in range(n)], seed=seed + step)
    b.step[:] = step
    b.sample_id[:] = torch.arange(n) + 100 * step
    return b


def test_select_and_cat_round_trip():
    b = step_batch(0, n=4)
    parts = [b.select([0, 1]), b.select([2, 3])]
    again = MistakeBatch.cat(parts, device="cpu")
    for name, t in b.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t)
    s = b.select([2])
    torch.testing.assert_close(s.h, b.h[b.y_offsets[2]:b.y_offsets[3]])
    torch.testing.assert_close(s.x_tilde, b.x_tilde[b.x_offsets[2]:b.x_offsets[3]])


def test_by_step_splits_in_step_order_and_at_step_renumbers():
    parts = [step_batch(s, n=2 + s % 2) for s in (3, 5, 9)]
    mixed = MistakeBatch.cat(parts, device="cpu")
    split = mixed.by_step()
    assert [int(b.step.unique()) for b in split] == [3, 5, 9]
    for got, ref in zip(split, parts, strict=True):
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], t)
    moved = split[1].at_step(40)
    assert moved.step.tolist() == [40] * split[1].num_entries
    for name, t in split[1].state_dict().items():
        if name != "step":
            torch.testing.assert_close(moved.state_dict()[name], t)
    assert split[1].step.tolist() == [5] * split[1].num_entries  # the original is untouched


def test_window_and_sampling():
    log = MemoryMistakeLog(window_steps=2, seed=0, rank=0)
    assert log.sample(step=0, num=4) is None
    for s in range(4):
        log.append(step_batch(s))
    assert len(log) == 9  # steps 1, 2 and 3 kept: step 3 samples from [1, 3)
    got = log.sample(step=4, num=5)
    assert set(got.step.tolist()) <= {2, 3}
    assert got.num_entries == 5 and got.sample_id.unique().numel() == 5  # without replacement
    # Current step excluded, the previous W steps in: at step 3 the window is [1, 3).
    assert set(log.sample(step=3, num=6).step.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="increase"):
        log.append(step_batch(3))


def test_sampling_is_deterministic_and_resumes_exactly():
    a = MemoryMistakeLog(window_steps=8, seed=5, rank=1)
    for s in range(5):
        a.append(step_batch(s))
    b = MemoryMistakeLog(window_steps=1, seed=0, rank=0)
    b.load_state_dict(a.state_dict())
    for step in (5, 6):
        x, y = a.sample(step=step, num=7), b.sample(step=step, num=7)
        assert x.sample_id.tolist() == y.sample_id.tolist()
        torch.testing.assert_close(x.h, y.h)
        a.append(step_batch(step))
        b.append(step_batch(step))
    other_rank = MemoryMistakeLog(window_steps=8, seed=5, rank=0)
    other_rank.load_state_dict({**a.state_dict(), "rank": 0})
    assert other_rank.sample(step=7, num=7).sample_id.tolist() != \
        a.sample(step=7, num=7).sample_id.tolist()
