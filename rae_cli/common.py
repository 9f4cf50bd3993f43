"""What every command shares: turning user-facing errors into one line, no traceback."""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading

import typer
from rich.console import Console

from stages.errors import RaeError

err_console = Console(stderr=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill``, torchrun stopping its ranks): unwound like Ctrl-C,
    so atomic writes clean up and the stage says how to go on."""


def _terminate_handler(main_pid: int):
    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked worker inherited this: die as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()
    return handler


def user_errors(fn):
    """Run a command; a RaeError (or a bad path) becomes ``error: <message>`` and exit code 1; Ctrl-C and
    SIGTERM end it with a line saying how to go on. The outputs it writes are given back either way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stages.artifacts.outputs import release_writers

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminate_handler(os.getpid()))
        try:
            return fn(*args, **kwargs)
        except RaeError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except OSError as e:  # the environment: a full disk, a read-only folder, a file where a folder goes
            err_console.print(f"[bold red]error:[/] {describe_os_error(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except Terminated:
            err_console.print("terminated (SIGTERM): run the same command again to resume", highlight=False)
            sys.exit(143)
        except KeyboardInterrupt:
            err_console.print("interrupted: run the same command again to resume", highlight=False)
            sys.exit(130)
        finally:
            release_writers()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: what, where, and what to do."""
    import errno

    where = f" {e.filename}" if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        return f"no space left on the device of{where or ' the output'}: free some space, then run the same command again (it resumes)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {what.lower()}; choose another --out or fix the permissions"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{where.strip() or 'a path'}: {what.lower()} (a file where a folder is needed, or the reverse); choose another --out"
    return f"{what}{':' + where if where else ''}"

