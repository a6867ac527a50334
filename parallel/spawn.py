"""Start N ranks of a command on this machine ourselves, as `torchrun --nproc-per-node N` does on one node.

Why not torchrun: when a rank fails, torchrun prints about 40 lines of its own traceback after the
rank's one-line reason and exits 1 whatever the rank's code was (2 for bad input). Here each rank's
output passes through unchanged, and the job ends with the first failing rank's reason as the last
line and its exit code. The ranks get the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with rank 0 hosting the rendezvous on a free
local port. One node only: across nodes use torchrun or srun.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

#: seconds the other ranks get to end by themselves after the first failure (they usually exit with
#: the same error, or see the closed connection), before SIGTERM; then SIGKILL after as long again
GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    #: the last line the rank wrote that starts with "error: " (its one-line reason), without the prefix
    error: str | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


def _forward(rank: _Rank, lock: threading.Lock) -> None:
    assert rank.proc.stderr is not None
    for line in rank.proc.stderr:
        if line.startswith("error: "):
            rank.error = line[len("error: "):].strip()
        with lock:
            sys.stderr.write(line)
            sys.stderr.flush()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell says


def spawn_local(command: Sequence[str], nproc: int, *, grace_s: float = GRACE_S) -> int:
    """Run `command` as ranks 0..nproc-1; returns 0, or the first failing rank's exit code after
    printing its one-line reason last."""
    port = free_port()
    lock = threading.Lock()
    ranks: list[_Rank] = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        # own session: a terminal's Ctrl-C reaches this process only, which passes it on once
        proc = subprocess.Popen(list(command), env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                                bufsize=1, start_new_session=True)
        rank = _Rank(r, proc)
        rank.reader = threading.Thread(target=_forward, args=(rank, lock), daemon=True)
        rank.reader.start()
        ranks.append(rank)

    def pass_on(signum: int, _frame: object) -> None:
        for rank in ranks:
            if rank.proc.poll() is None:
                rank.proc.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first = _wait(ranks, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for rank in ranks:
            assert rank.reader is not None
            rank.reader.join(timeout=5)
    if first is None:
        return 0
    # the first failing rank's own line; on bad input only rank 0 prints one (the others exit 2
    # silently, maybe sooner), so then the first failed rank that said why
    if first.error is None:
        first = next((r for r in ranks if r.error and r.proc.returncode != 0), first)
    code = _exit_code(first.proc.returncode)
    reason = first.error or "no error line (see the output above)"
    failed = sum(r.proc.returncode != 0 for r in ranks)
    print(f"error: {reason} (rank {first.rank} exited {code}; {failed} of {len(ranks)} ranks failed)",
          file=sys.stderr, flush=True)
    return code


def _wait(ranks: list[_Rank], grace_s: float) -> _Rank | None:
    """Wait for every rank; after the first failure give the rest `grace_s`, then SIGTERM, then SIGKILL."""
    first: _Rank | None = None
    failed_at = 0.0
    stage = 0  # 0 waiting, 1 terminated, 2 killed
    while any(r.proc.poll() is None for r in ranks):
        if first is None:
            first = next((r for r in ranks if r.proc.poll() not in (None, 0)), None)
            failed_at = time.monotonic()
        elif stage < 2 and time.monotonic() - failed_at > grace_s * (stage + 1):
            for r in ranks:
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM if stage == 0 else signal.SIGKILL)
            stage += 1
        time.sleep(0.05)
    if first is None:
        first = next((r for r in ranks if r.proc.returncode != 0), None)
    return first
