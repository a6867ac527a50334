"""Exceptions the CLI turns into exit codes (input: 2 with one line; run failures: their own code)."""


class InputError(ValueError):
    """Bad user input found before any weight is loaded: the CLI prints one line and exits 2."""


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
