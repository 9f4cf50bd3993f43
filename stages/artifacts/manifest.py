"""``manifest.json``: what an artifact is, how it was made, from what, and whether it is finished.

Every artifact directory carries one. It is written atomically (temporary file + rename), and an
artifact counts as finished only once its manifest says ``"complete": true`` — the last write of a
stage — so a killed run never leaves something that looks complete.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..digests import sha256_file
from ..errors import ArtifactError
from ..options import field_flag
from ..progress import console
from .atomic import atomic_write_json, jsonable
from .outputs import claim_writer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# The key under which a finished artifact records its files (``file_records``).
RECORDS = "written_files"

KINDS = ("latent-store", "sample-store", "decoder-run", "diffusion-run", "latent-stats", "image-folder", "eval")


def claim_output(out: str | os.PathLike, overwrite: bool, reuse, different, foreign: str, intact=None) -> str | None:
    """Where a stage is to write its artifact, become its only writer (``stages.artifacts.outputs``), then
    decide what to do with what is already there.

    ``reuse(manifest)`` looks at a rae artifact at ``out``: "done" or "resume" (returned as they
    are) when it is this stage's own, with the same identity; "replace" to replace it even without
    ``overwrite`` (an interrupted import); None for another one, which is deleted with ``overwrite``
    and refused otherwise with ``different`` (a message, or a function of the manifest making one).
    ``intact(out)`` raises ArtifactError when an artifact to be reused cannot be read (a folder left
    broken by a crash or an older rae): replaced with ``overwrite``, refused otherwise.
    A folder that holds anything but is no rae artifact is never touched: refused with ``foreign``.
    Returns None when ``out`` is then absent or an empty folder."""
    claim_writer(out, say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    out = Path(out)
    if (out / MANIFEST).is_file():
        old = read_manifest(out, require_complete=False)
        state = reuse(old)
        if state in ("done", "resume") and intact is not None:
            try:
                intact(out)
            except ArtifactError as e:
                if not overwrite:
                    raise ArtifactError(f"{out} is damaged and cannot be resumed ({e}); pass --overwrite to "
                                        "replace it") from None
                state = "replace"
        if state in ("done", "resume"):
            return state
        if state != "replace" and not overwrite:
            raise ArtifactError(different(old) if callable(different) else different)
        shutil.rmtree(out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(foreign)
    return None


def describe_difference(out, cfg, old: dict, inputs: dict[str, str | None] | None = None) -> str:
    """Why the artifact whose manifest is ``old`` is not the one ``cfg`` asks for, as one line: the
    options that differ (``--lr 0.0001 there, 0.0002 here``; run settings, ``cfg.RUN_ONLY``, never do)
    and the inputs (``{name: content id now}``) whose content differs. Ends with what to do."""
    was, now = old.get("config") or {}, jsonable(cfg)
    run_only = set(getattr(cfg, "RUN_ONLY", ()))
    parts = [f"{field_flag(f)} {json.dumps(was[f.name])} there, {json.dumps(now[f.name])} here"
             for f in dataclasses.fields(cfg)
             if f.name not in run_only and f.name in was and was[f.name] != now[f.name]]
    parts += [f"another {name} (other content)" for name, cid in (inputs or {}).items()
              if (old.get("inputs", {}).get(name) or {}).get("content_id") != cid]
    what = "; ".join(parts) if parts else "made by another rae version or with another encoder"
    return f"{out} was made differently ({what}); pass --overwrite to replace it, or choose another --out"


def resume_if_same(kind: str, identity: str):
    """``claim_output``'s ``reuse`` for an artifact of ``kind`` made with ``identity``: "done" when
    it is complete, "resume" when not; None for any other."""
    def reuse(old: dict) -> str | None:
        if old.get("kind") == kind and old.get("identity") == identity:
            return "done" if old.get("complete") else "resume"
        return None
    return reuse


def create_artifact_dir(out: str | os.PathLike, build) -> None:
    """Make a new artifact folder: ``build(folder)`` fills a staging folder beside ``out`` (its
    manifest included), which is then renamed to ``out`` in one step. A kill leaves either no ``out``
    or one with its manifest, never a folder that no command recognises; a failure removes its own
    staging folder, and those of killed runs are removed by the next (the caller is the output's only
    writer: ``claim_output``). ``out`` must not exist (or be an empty folder)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.creating*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.creating{os.getpid()}"
    try:
        build(staging)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()


def new_manifest(kind: str, config: Any, inputs: dict[str, dict] | None = None, **extra: Any) -> dict:
    assert kind in KINDS, kind
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "rae_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "config": jsonable(config),
        "inputs": inputs or {},
        **jsonable(extra),
    }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def has_manifest(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                  require_complete: bool = True, what: str = "input") -> dict:
    """Read and check a manifest; every problem is one ArtifactError line naming the path."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise ArtifactError(f"{what} not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a rae artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise ArtifactError(f"{path} is not a rae manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{directory} was written by a newer rae (format {manifest['format_version']}); upgrade rae")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest["kind"] not in kinds:
        raise ArtifactError(f"{directory} is a {manifest['kind']}, but this {what} must be a {' or '.join(kinds)}")
    if require_complete and not manifest.get("complete", False):
        raise ArtifactError(f"{directory} is unfinished (its stage was interrupted): run the command that made it again to complete it")
    return manifest


def file_records(directory: str | os.PathLike, names) -> dict[str, dict]:
    """What a finished artifact's files are (``manifest[RECORDS]``): size, modification time and
    sha256 of each of ``names`` that exists, so that a file swapped or edited afterwards is caught."""
    records = {}
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            st = path.stat()
            records[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    return records


def changed_files(directory: str | os.PathLike, manifest: dict) -> list[tuple[str, str]]:
    """The recorded files (``file_records``) that are no longer what was written, with why. Size and
    modification time unchanged: trusted without reading; otherwise the content is hashed, so a copy
    with new times but the same bytes passes."""
    changed = []
    for name, rec in (manifest.get(RECORDS) or {}).items():
        path = Path(directory) / name
        try:
            st = path.stat()
        except OSError:
            changed.append((name, "missing"))
            continue
        if st.st_size != rec["size"]:
            changed.append((name, f"{rec['size']} bytes when written, {st.st_size} now"))
        elif st.st_mtime_ns != rec["mtime_ns"] and sha256_file(path) != rec["sha256"]:
            changed.append((name, "its content differs from what was written"))
    return changed


def verify_files(directory: str | os.PathLike, manifest: dict) -> None:
    """Refuse, in one line, an artifact whose recorded files were changed after it was finished."""
    changed = changed_files(directory, manifest)
    if changed:
        name, why = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ArtifactError(f"{Path(directory) / name} was changed after rae wrote it ({why}){more}; restore it, "
                            "or make the artifact again with the command that made it")


def input_ref(directory: str | os.PathLike, manifest: dict) -> dict:
    """How an artifact names one of its inputs: kind, absolute path and content id."""
    return {"kind": manifest["kind"], "path": str(Path(directory).resolve()),
            "content_id": manifest.get("content_id")}
