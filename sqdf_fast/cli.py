"""How every command ends: exit status 0 on success, 1 on an error while running, 2 on a usage error.

A usage error is a bad option or value found before any work (argparse's own errors, `config.parse`, the argument
checks of compare, bbo, export and sample, a resume that changes an option it may not); a run error is found while
working (an unreadable checkpoint, a plug-in task or reward that fails, the non-finite guard). Either is one
`error: ...` line on stderr, never a traceback:

    def main(argv=None):
        with cli.usage_errors():          # ValueError -> exit 2
            cfg = parse(argv)
        with cli.run_errors():            # UsageError -> exit 2; other ValueError, RuntimeError -> exit 1
            work(cfg)

Code called from Python (notebooks, `sqdf_fast.train.run`) raises the exceptions themselves; only the commands turn
them into exits.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn

RUN_ERROR, USAGE_ERROR = 1, 2
EPILOG = ("Exit status: 0 done, 1 an error while running, 2 a usage error (a bad option or value, found before any "
          "work).")


class UsageError(ValueError):
    """A bad option or value, found before any work (exit status 2), wherever it is raised under a command."""


class CommandExit(SystemExit):
    """SystemExit with the exit status as its `code` and the error line (already on stderr) as its text."""

    def __init__(self, code: int, line: str):
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(message: str, code: int) -> NoReturn:
    """Write `error: message` to stderr and exit with `code`."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    raise CommandExit(code, line)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """A ValueError inside is a usage error: one line, exit 2."""
    try:
        yield
    except ValueError as err:
        fail(str(err), USAGE_ERROR)


@contextlib.contextmanager
def run_errors() -> Iterator[None]:
    """A UsageError inside exits 2, any other ValueError or RuntimeError 1; one line either way."""
    try:
        yield
    except UsageError as err:
        fail(str(err), USAGE_ERROR)
    except (ValueError, RuntimeError) as err:
        fail(str(err), RUN_ERROR)
