"""How the CLI ends: an exit code and at most one line on stderr for every kind of failure, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

from pipelines.errors import GalleryMatchError

USAGE = 2


def exit_code_of(exc: BaseException) -> int:
    """Report `exc` in one line (usage errors with their usage text) and return the exit code."""
    import click
    import pydantic
    import typer
    from typer import _click as typer_click  # typer vendors its own click: its usage errors are not click's

    if isinstance(exc, BrokenPipeError) or _after_broken_pipe(exc):
        silence_stdout()  # the reader went away (`| head`): stop quietly, as git does
        return 0
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0
    if isinstance(exc, click.exceptions.Exit | typer.Exit):
        return int(exc.exit_code)
    if isinstance(exc, click.ClickException | typer_click.exceptions.ClickException):
        exc.show()
        return int(exc.exit_code)
    if isinstance(exc, click.exceptions.Abort | typer.Abort | KeyboardInterrupt):
        _say("interrupted")
        return 130
    if isinstance(exc, GalleryMatchError):
        _say(f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, pydantic.ValidationError):
        _say(f"error: invalid setting: {_settings_problem(exc)}")
        return USAGE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        _say(f"error: no space left on the device ({exc.filename or 'a write'}); free space and rerun")
        return 1
    return _unexpected(exc)


def _after_broken_pipe(exc: BaseException) -> bool:
    """typer turns a closed pipe (EPIPE) into `sys.exit(1)`, even outside standalone mode."""
    cause = exc.__context__
    return isinstance(exc, SystemExit) and isinstance(cause, OSError) and cause.errno == errno.EPIPE


def _settings_problem(exc: object) -> str:
    errors = exc.errors()  # type: ignore[attr-defined]
    return "; ".join(
        f"GALLERYMATCH_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']} (got {e.get('input')!r})"
        for e in errors
    )


def _unexpected(exc: BaseException) -> int:
    if os.environ.get("GALLERYMATCH_DEBUG") == "1":  # not "0", not ""
        traceback.print_exception(exc)
    else:
        _say(f"error: unexpected {type(exc).__name__}: {str(exc)[:300]} (set GALLERYMATCH_DEBUG=1 for the traceback)")
    return 1


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        print(line.replace("\n", " "), file=sys.stderr)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
