"""Every file rae writes is written atomically: into a temporary file beside it, then renamed into
place in one step, so a reader never sees a partial file and a failed write leaves nothing behind.
Configs and records become plain JSON values on the way (``jsonable``)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
from pathlib import Path
from typing import Any


def jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples -> plain JSON values (configs go into manifests as they are)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


_TEMPORARY = re.compile(r"^\..+\.tmp[0-9.]*$")  # what atomic writes name their files before the rename


def remove_temporaries(root: str | os.PathLike) -> int:
    """Delete the temporary files that killed writers left under ``root`` (``.NAME.tmpPID[.TID]``):
    called once a stage has finished its artifact, when no writer of it is left. Returns how many."""
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if _TEMPORARY.match(name):
                Path(folder, name).unlink(missing_ok=True)
                n += 1
    return n


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike):
    """Every file rae writes goes through here: the block writes the yielded temporary path beside
    ``path`` (``.NAME.tmpPID.TID``, unique per writer thread), which is then renamed to ``path`` in
    one step; if the block fails (a full disk, a kill's KeyboardInterrupt) it is deleted instead. A
    reader never sees a partial file, and a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data) -> None:
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_replace(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")
