"""Evaluation work split over ranks: equal batch counts per rank (their counts are summed by
tcp.runtime.collective.sum_across_ranks)."""

from __future__ import annotations

import math
from typing import Any


def shard_batches(samples: list[Any], *, rank: int, world: int, batch_size: int
                  ) -> list[tuple[list[Any], int]]:
    """This rank's batches as (items, n_real); every rank gets the same number of batches."""
    shard = samples[rank::world]
    n_batches = math.ceil(math.ceil(len(samples) / world) / batch_size)
    out = []
    for i in range(n_batches):
        items = shard[i * batch_size:(i + 1) * batch_size]
        n_real = len(items)
        if n_real == 0:  # keep ranks in step: run a throw-away batch
            items = samples[:1]
        out.append((items, n_real))
    return out
