"""Run a function as N ranks of a real gloo group, one thread per rank, in this process.

Pure-logic tests of rank agreement need a real collective but not N interpreters: threads with
`ProcessGroupGloo` over a `HashStore` give exactly gloo's semantics in milliseconds.
"""
from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def run_ranks(world: int, rank_main: Callable[[int, dist.ProcessGroup], Any], timeout_s: float = 60) -> list[Any]:
    """`rank_main(rank, group)` on `world` threads; returns their results in rank order, re-raising errors."""
    store = dist.HashStore()
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            group = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=30))
            results[rank] = rank_main(rank, group)
        except BaseException as exc:  # a thread swallows exceptions otherwise
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    assert len(results) == world, f"{world - len(results)} rank thread(s) did not finish in {timeout_s} s"
    return [results[r] for r in range(world)]
