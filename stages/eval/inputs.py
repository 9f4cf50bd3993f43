"""The images ``rae eval`` scores: a folder (sorted relative paths, recursive; of a ``rae decode``
folder only its numbered PNGs) or an ADM ``.npz`` (``arr_0``: uint8 N x H x W x 3), read by index,
with the checks that refuse what would be scored wrongly and the digests that name what was scored.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..artifacts.atomic import atomic_replace
from ..artifacts.images import load_rgb, walk_files
from ..artifacts.manifest import read_manifest
from ..errors import ArtifactError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def first_line(e: Exception) -> str:
    """The first line of an error's message (messages to the user are one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _list_image_files(root: Path) -> list[str]:
    """Image files under ``root`` as sorted relative posix paths; the safe walk leaves out symlink loops,
    FIFOs, dangling links and rae artifacts inside the folder (never ``root`` itself)."""
    return sorted(walk_files(root, IMAGE_SUFFIXES)[0])


def _npz_member(path: Path, name: str) -> tuple[tuple, np.dtype, int | None]:
    """(shape, dtype, byte offset of the data or None) of ``name`` inside an .npz, without reading it.

    ``np.savez`` stores members uncompressed, so the array's bytes sit contiguously in the file and
    can be memory-mapped: 50,000 images are never loaded at once, and each rank reads only its share.
    """
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(f"{name}.npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)(f)
                header_len = f.tell()
    except KeyError:
        raise ArtifactError(f"{path} has no '{name}' array") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path} as an .npz: {first_line(e)}") from None
    shape, fortran, dtype = header
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and not fortran and not dtype.hasobject:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_len
    return shape, dtype, offset


def _check_member_crc(path: Path, name: str) -> None:
    """The zip CRC-32 of an uncompressed member, streamed (a flipped byte would be scored otherwise)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
        crc, left = 0, info.file_size
        with z.open(info) as f:
            f._expected_crc = None  # zipfile's own check at EOF would raise a generic error; ours names the file
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    break
                crc, left = zlib.crc32(block, crc), left - len(block)
    if crc != info.CRC:
        raise ArtifactError(f"{path}: {name} fails its zip checksum (the file is corrupt); write it again")


def npz_keys(path: str | os.PathLike) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"cannot read {path} as an .npz: {e}") from None


def read_adm_npz(path: str | os.PathLike) -> np.ndarray:
    """The images of an ADM .npz (``arr_0``, uint8 N x H x W x 3): memory-mapped when stored
    uncompressed (as ``np.savez`` writes it), else loaded."""
    path = Path(path)
    shape, dtype, offset = _npz_member(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ArtifactError(f"{path}: arr_0 must be uint8 N x H x W x 3 (the ADM format), got {dtype} {shape}")
    if offset is not None:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    with np.load(path, allow_pickle=False) as z:
        return z["arr_0"]


def save_adm_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write images (uint8 N x H x W x 3) in the ADM format: ``arr_0`` (+ ``arr_1`` labels), uncompressed."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"ADM images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels)}
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:  # a file: np.savez would append ".npz" to a name
        np.savez(f, **arrays)


class ImageSet:
    """Images by index, uint8 H x W x 3: a folder (sorted relative paths) or an ADM .npz."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"images not found: {self.path}")
        self._arr = None
        if self.path.is_dir():
            self.kind = "folder"
            self.files = _list_image_files(self.path)
            if (self.path / "manifest.json").is_file():  # a `rae decode` folder: its numbered PNGs, not grid.png
                read_manifest(self.path, kind="image-folder", what="image folder")  # unfinished: refused
                self.files = [f for f in self.files if re.fullmatch(r"\d+\.png", f)]
            if not self.files:
                raise ArtifactError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.path}")
            self.n = len(self.files)
            self.mappable = True
        elif self.path.suffix == ".npz":
            self.kind = "npz"
            self.files = None
            shape, dtype, offset = _npz_member(self.path, "arr_0")
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ArtifactError(f"{self.path}: arr_0 must be uint8 N x H x W x 3 (the ADM format), got {dtype} {shape}")
            self.n = shape[0]
            self.mappable = offset is not None  # compressed members are loaded once, in one process
            if offset is not None:  # memory-mapped reads skip the zip's checksum: check it once here
                _check_member_crc(self.path, "arr_0")
        else:
            raise ArtifactError(f"{self.path} is neither an image folder nor an .npz")
        if self.n == 0:
            raise ArtifactError(f"{self.path} holds no images (arr_0 has 0 of them): nothing to score")

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return self.files[i] if self.files is not None else f"{self.path.name}[{i}]"

    def __getitem__(self, i: int) -> np.ndarray:
        if self.kind == "folder":
            return np.asarray(load_rgb(self.path / self.files[i], min_size=1))
        if self._arr is None:
            self._arr = read_adm_npz(self.path)
        return np.asarray(self._arr[i])

    def __getstate__(self):  # DataLoader workers reopen the memory map themselves
        return {**self.__dict__, "_arr": None}

    def listing_sha256(self) -> str:
        """Digest of what the set is made of (file names and sizes, or the .npz file's size and shape)."""
        h = hashlib.sha256()
        if self.files is not None:
            for rel in self.files:
                h.update(f"{rel}\t{os.path.getsize(self.path / rel)}\n".encode())
        else:
            h.update(f"{self.path.name}\t{os.path.getsize(self.path)}\t{self.n}\n".encode())
        return h.hexdigest()


def artifact_content_id(path: Path) -> str | None:
    """The content id of the rae artifact at (or holding) ``path``, if it is one."""
    folder = path if path.is_dir() else path.parent
    if not (folder / "manifest.json").is_file():
        return None
    try:
        return read_manifest(folder, require_complete=False).get("content_id")
    except ArtifactError:
        return None
