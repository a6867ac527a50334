"""Liveness: a heartbeat all-reduce on its own gloo group, from a thread on every rank.

The rank loop notices a dead peer only at its next collective, and a replica that is generating
alone (dp replicas of one rank each) makes none for the whole video. This thread makes one
each second on a group of its own, so a SIGKILLed rank is seen within a second (gloo: the
connection closes) or at worst --dist-timeout (a silent peer), whatever the main thread does.

Stopping is agreed in the same all-reduce (MAX of each rank's stop flag), so every rank leaves
the heartbeat at the same iteration and none waits for a partner that has already gone.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: seconds between heartbeats
PERIOD_S = 1.0


class Watchdog:
    def __init__(self, group: Any, on_lost: Callable[[BaseException], None]) -> None:
        self.group = group
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> Watchdog:
        if self.group is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        import torch
        import torch.distributed as dist

        try:
            while True:
                flag = torch.tensor([1.0 if self._stop.is_set() else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
                if flag.item() > 0:
                    return
                self._stop.wait(PERIOD_S)
        except Exception as e:  # noqa: BLE001 - any failure of the heartbeat means a peer is gone
            self.on_lost(e)

    def stop(self) -> None:
        """Leave the heartbeat with every rank (they all stop at the same iteration), drop the group."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.group = None
