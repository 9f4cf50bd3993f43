"""Content digests: the sha256 of a file (weights, released checkpoints, a finished run's files).
A module of its own, below everything that hashes, because it must not import torch: `rae info`
checks a run's files without it."""
from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
