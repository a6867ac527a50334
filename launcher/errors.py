"""Exceptions the CLI turns into exit codes (input: 2 with one line; run failures: their own code)."""


class InputError(ValueError):
    """Bad user input found before any weight is loaded: the CLI prints one line and exits 2."""


class UsageError(InputError):
    """A flag with a bad value. The CLI prints the message as one line and exits 2."""


#: input errors of the packages below launcher/, which cannot subclass InputError (they never import launcher/)
_FOREIGN_INPUT_ERRORS = (("magcache.ratios", "RatioTableError"), ("parallel.launch", "LaunchError"),
                         ("parallel.mesh", "ParallelConfigError"))


def is_input_error(exc: BaseException) -> bool:
    """Bad input, whichever package noticed it: the CLI prints its one line and exits 2, in one place.

    The foreign types are looked up only in modules already imported (whatever raised them was),
    so a bad flag never pays for importing torch just to be classified.
    """
    import sys

    if isinstance(exc, InputError):
        return True
    for module, name in _FOREIGN_INPUT_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def one_line(exc: BaseException) -> str:
    """An error's first line (its type's name when it has no message): what a summary row shows."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RunFailed(RuntimeError):
    """A run that started but could not finish (a rank died, disk full...); carries its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM (or SIGINT) arrived: unwind so temp files are removed, then exit 128 + signal.

    A BaseException so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class PeerLost(RunFailed):
    """This rank's collectives failed because another rank died or stopped answering.

    Unlike other RunFailed errors it is printed by every rank that notices, not only rank 0:
    rank 0 may be the one that died. Exit 1; the launcher (torchrun, srun) names the dead rank.
    """


#: Where torch's c10d backends name themselves in the RuntimeErrors they raise. gloo raises plain
#: RuntimeError ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ..."), not DistError.
_BACKEND_MARKERS = ("gloo", "NCCL", "c10d", "ProcessGroup")


def peer_lost(exc: BaseException, during: str = "") -> PeerLost | None:
    """The one-line PeerLost for a collective that failed on a dead or silent peer, else None.

    `during`: what this rank was doing ("denoise", "loading the model"...), so a user reading
    several ranks' interleaved output sees where the job broke without a C++ traceback.
    """
    import sys

    if "torch.distributed" not in sys.modules:
        return None  # nothing distributed ran, so nothing distributed failed
    import torch.distributed as dist

    text = str(exc)
    is_comm = isinstance(exc, dist.DistError) or (
        type(exc) is RuntimeError and any(m in text for m in _BACKEND_MARKERS)
    )
    if not is_comm:
        return None
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = "another rank stopped answering (no reply within --dist-timeout; it may be stuck or dead)"
    else:
        what = "lost contact with another rank (it failed or was killed)"
    where = f" {during}" if during else ""
    return PeerLost(f"{what}{where}; see the failing rank's output above")
