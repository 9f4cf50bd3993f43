"""Where a stage writes: never over one of its own inputs, and one writer per output at a time.

``refuse_overlap`` runs first in every stage, before anything is read or written: an output that
is one of the command's inputs, lies inside one, or holds one is refused in one line, whatever the
options (``--overwrite`` would otherwise delete the input). Paths are compared as the filesystem
sees them: symlinks and ``..`` resolved, and folders matched by (device, inode), so a bind mount or a
second link to the same folder is caught too.

``claim_writer`` takes the output's lock file, ``.NAME.lock`` beside the output, before the stage
touches it (``stages.artifacts.manifest.claim_output`` calls it). The lock is a POSIX record lock
(``fcntl.lockf``): the kernel drops it when its process dies, and network filesystems (NFS) carry it
to every machine that mounts the folder. The file names its owner (host, pid, command), which the
refusal of a second writer quotes. A lock file left by a dead process is taken over with a note.
Ranks of one ``torchrun`` job are one writer: rank 0 holds the lock for the job. Released when the
stage ends (``release_writers``) or the process exits.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime as _dt
import errno
import functools
import json
import os
import socket
import sys
from pathlib import Path

from ..errors import ArtifactError
from ..options import field_flag

# Config fields that name what a stage writes; every other path field is an input.
OUTPUT_FIELDS = ("out", "save_ref")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: str | os.PathLike) -> list[tuple[str, tuple[int, int]]]:
    """The existing folders from ``path`` (resolved) up to the root, with their (device, inode)."""
    real = os.path.realpath(path)
    chain, cur = [], real
    while True:
        ident = _identity(cur)
        if ident is not None:
            chain.append((cur, ident))
        parent = os.path.dirname(cur)
        if parent == cur:
            return chain
        cur = parent


def overlap(out: str | os.PathLike, inp: str | os.PathLike) -> str | None:
    """How ``out`` and ``inp`` overlap: "same", "inside" (out lies inside inp), "holds" (inp lies
    inside out), or None."""
    inp_id = _identity(os.path.realpath(inp))
    out_chain = _chain(out)
    if inp_id is not None and out_chain:
        if out_chain[0][0] == os.path.realpath(out) and out_chain[0][1] == inp_id:
            return "same"
        if any(ident == inp_id for _, ident in out_chain):
            return "inside"
    out_id = _identity(os.path.realpath(out))
    if out_id is not None and any(ident == out_id for _, ident in _chain(inp)[1:]):
        return "holds"
    # Not on disk (yet): compare the resolved names.
    o, i = os.path.realpath(out), os.path.realpath(inp)
    if o == i:
        return "same"
    if o.startswith(i.rstrip(os.sep) + os.sep):
        return "inside"
    if i.startswith(o.rstrip(os.sep) + os.sep):
        return "holds"
    return None


def config_paths(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(outputs, inputs) of a stage's config: its path options that are set, by option name."""
    outputs, inputs = {}, {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("path") or value in (None, ""):
            continue
        name = field_flag(f) if not f.metadata.get("argument") else f.name.upper()
        (outputs if f.name in OUTPUT_FIELDS else inputs)[name] = str(value)
    return outputs, inputs


def refuse_overlap(cfg, extra_inputs: dict[str, str] | None = None, allow_inside: tuple[str, ...] = ()) -> None:
    """Refuse, in one line and before anything is touched, an output of ``cfg`` that is one of its
    inputs, lies inside one or holds one. ``extra_inputs``: inputs that are not options, {phrase: path} (the source
    images a latent store was made from). ``allow_inside``: names of inputs an output may lie inside
    (eval.json in a ``rae decode`` folder, its documented place)."""
    outputs, inputs = config_paths(cfg)
    named = {name: (f"the input {name} {path}", path) for name, path in inputs.items()}
    named.update({phrase: (f"{phrase} ({path})", path) for phrase, path in (extra_inputs or {}).items()})
    for oname, out in outputs.items():
        for iname, (label, inp) in named.items():
            how = overlap(out, inp)
            if how is None or (how == "inside" and iname in allow_inside):
                continue
            what = {"same": "is", "inside": "lies inside", "holds": "holds"}[how] + " " + label
            raise ArtifactError(f"{oname} {out} {what}: an output must never replace or sit inside an input; "
                                f"choose another {oname}")


def stage(run=None, *, extra_inputs=None, allow_inside=None):
    """Decorator of a stage's ``run(cfg)``: ``refuse_overlap`` first (with ``extra_inputs(cfg)`` and
    ``allow_inside(cfg)`` when given), and the outputs' locks given back when it ends, however it ends."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            refuse_overlap(cfg, extra_inputs(cfg) if extra_inputs else None,
                           allow_inside(cfg) if allow_inside else ())
            try:
                return fn(cfg, *args, **kwargs)
            finally:
                release_writers()
        return wrapper

    return decorate(run) if run is not None else decorate


#################################################################################
#                              One writer per output                            #
#################################################################################

_HELD: dict[str, "_Lock"] = {}


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


def _owner_line(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
            + (f" (`{info['command']}`)" if info.get("command") else ""))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass
class _Lock:
    path: Path
    fd: int
    posix: bool  # False on a filesystem without record locks: the file's presence is the lock


def _read_owner(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:500]}


def _write_owner(fd: int, info: dict) -> None:
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def claim_writer(out: str | os.PathLike, say=None) -> None:
    """Become the only writer of ``out`` until ``release_writers`` or the end of the process; raise a
    one-line ArtifactError naming the owner when another process writes it. Idempotent within one
    process. ``say(line)`` reports a stale lock taken over."""
    import fcntl

    key = os.path.abspath(out)
    if key in _HELD:
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            posix = True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                owner = _read_owner(fd)
                os.close(fd)
                raise ArtifactError(f"{out} is being written by another rae process ({_owner_line(owner)}); "
                                    f"wait for it to end, or stop it, then run this command again") from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            posix = False  # no record locks here: judge by the owner the file names
        # The lock must be on the file that is at ``path`` now (a releasing writer unlinks it).
        here = _identity(str(path))
        st = os.fstat(fd)
        if here != (st.st_dev, st.st_ino):
            os.close(fd)
            continue
        break
    old = _read_owner(fd)
    if old and (old.get("host"), old.get("pid")) != (socket.gethostname(), os.getpid()):
        if not posix and (old.get("host") != socket.gethostname() or _process_alive(int(old.get("pid", 0)))):
            os.close(fd)
            raise ArtifactError(f"{out} is being written by another rae process ({_owner_line(old)}); this "
                                f"filesystem has no file locks: if no such process runs, delete {path}")
        if say is not None:
            say(f"note: {out} was left locked by {_owner_line(old)}, which is gone; taking it over")
    _write_owner(fd, _me())
    _HELD[key] = _Lock(path, fd, posix)


def release_writers() -> None:
    """Give up every output this process writes (the end of a stage, or of the process)."""
    while _HELD:
        _, lock = _HELD.popitem()
        try:
            os.unlink(lock.path)  # while still holding it: a waiting writer then sees a new file
        except OSError:
            pass
        os.close(lock.fd)


def holds_writer(out: str | os.PathLike) -> bool:
    return os.path.abspath(out) in _HELD


atexit.register(release_writers)
