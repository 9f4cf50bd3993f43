"""What every command shares: turning user-facing errors into one line, no traceback."""
from __future__ import annotations

import functools
import os
import re
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
        except BaseException as e:  # noqa: BLE001 (sorted below; anything else goes on up)
            stop = stopped_by(e)
            if stop is not None and previous is not None and hasattr(signal, "SIGCHLD"):
                # Exiting: the workers that the same stop ended must not raise from torch's SIGCHLD handler
                # again at interpreter exit (an "Exception ignored in atexit callback" traceback).
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if isinstance(stop, Terminated):
                err_console.print("terminated (SIGTERM): run the same command again to resume", highlight=False)
                sys.exit(143)
            if stop is not None:
                err_console.print("interrupted: run the same command again to resume", highlight=False)
                sys.exit(130)
            if isinstance(e, RaeError):
                err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            if isinstance(e, OSError):  # the environment: a full disk, a read-only folder, a file where a folder goes
                err_console.print(f"[bold red]error:[/] {describe_os_error(e)}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            worker = worker_signal(e)
            if worker:
                err_console.print(f"[bold red]error:[/] a data-loading worker was killed (signal {worker}; the "
                                  "system's out-of-memory killer sends Killed): run the same command again, with a "
                                  "smaller --num-workers if it recurs; it resumes from its last checkpoint",
                                  highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            raise
        finally:
            release_writers()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


# torch.utils.data's message when a worker process dies of a signal (its SIGCHLD handler raises it).
_WORKER_KILLED = re.compile(r"DataLoader worker \(pids? ?[^)]*\) (?:is )?killed by signal: ([A-Za-z][A-Za-z ]*)")


def worker_signal(e: BaseException) -> str | None:
    """The signal's name ("Terminated", "Killed", ...) if ``e`` is torch's error for a data-loading worker that
    died of one."""
    found = _WORKER_KILLED.search(str(e)) if isinstance(e, RuntimeError) else None
    return found[1] if found else None


def stopped_by(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``e``, if it is one or was raised while one unwound the stage. A stop
    sent to the whole process group (a scheduler's time limit, ``timeout``, ``kill -- -PGID``) also ends
    the data-loading workers; torch then raises "DataLoader worker ... killed by signal: Terminated" in
    the middle of the unwinding, which is the same stop, not a second error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        worker = worker_signal(e)
        if worker == "Terminated":
            return Terminated()
        if worker == "Interrupt":
            return KeyboardInterrupt()
        e = e.__cause__ or e.__context__
    return None


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

