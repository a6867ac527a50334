"""SIGTERM and SIGINT: the CLI's handlers, and holding them while process groups are torn down.

Both in one place because they work together: `install_signal_handlers` makes a signal unwind the
run (temp files removed, exit 128 + signal), and `signals_deferred` keeps that unwinding out of
the one section it would break (the World's teardown), delivering the signal afterwards.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from launcher.errors import Terminated


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM (torchrun, srun, schedulers) and Ctrl-C unwind the run: temp files go away.

    Our own exception for SIGINT too, because Typer turns KeyboardInterrupt into a silent
    return code; an ignored SIGINT (background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_terminated)


@contextlib.contextmanager
def signals_deferred(*, deliver: bool) -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the process groups are gone; then deliver them, or drop them.

    After a peer dies, torchrun/srun SIGTERM the survivors while they are already tearing down;
    our handler raising `Terminated` in the middle of DistContext.shutdown would skip releasing the
    groups and bring back the gloo abort at exit. `deliver=False` (teardown after a failure): the
    process is already ending with the real reason (a dead peer, a full disk), which a late
    "stopped by SIGTERM" would hide; `deliver=True` (clean end): re-raise, so the exit is 143/130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler):  # a Python handler (ours, or KeyboardInterrupt's); leave SIG_IGN/SIG_DFL be
            saved[sig] = handler
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending) if deliver else ():
            signal.raise_signal(sig)
