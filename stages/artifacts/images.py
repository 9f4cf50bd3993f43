"""Image folders in, uint8 crops out: listing, robust loading and the ADM center crop."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL import __version__ as PIL_VERSION

from ..errors import ArtifactError, RaeError
from ..progress import progress

# Decompression-bomb guard stays on, but at a size real photographs never reach.
Image.MAX_IMAGE_PIXELS = 400_000_000


@dataclass
class ImageList:
    root: Path
    files: list[str]           # paths relative to root, sorted
    labels: list[int]          # class index (sorted folder names, as torchvision's ImageFolder) or -1
    class_names: list[str]     # empty for a flat folder
    ignored: list[str]         # files at the root of a class-layout folder (not part of any class)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why) left out by the walk
    stats: list[tuple[int, int]] = field(default_factory=list)    # (st_size, st_mtime_ns) of each of files

    def content_id(self) -> str:
        """Digest of the file list with sizes: a changed folder is detected on resume."""
        h = hashlib.sha256()
        sizes = ([s for s, _ in self.stats] if len(self.stats) == len(self.files)
                 else [os.path.getsize(self.root / rel) for rel in self.files])
        for rel, size in zip(self.files, sizes):
            h.update(f"{rel}\t{size}\n".encode())
        return h.hexdigest()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown type"


def _open_nonblocking(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open read-only without ever blocking (a plain open of a FIFO waits for a writer forever) and
    fstat what was opened, so the caller can refuse anything that is not a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _is_rae_artifact(folder: str) -> bool:
    """Whether ``folder`` holds a rae manifest (a JSON object with "kind"): rae's outputs put inside an
    input folder must not be read back as images or become a class."""
    try:
        fd, st = _open_nonblocking(os.path.join(folder, "manifest.json"))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(st.st_mode):
                return False
            data = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "kind" in data


class _Walk(NamedTuple):
    files: list[tuple[tuple[str, ...], tuple[int, int]]]  # (parts relative to the root, (size, mtime_ns))
    skipped: list[tuple[str, str]]                          # (relative posix path, why)
    top_dirs: list[str]  # the root's subfolders that were entered or reached twice (not artifacts, not the root)


def _walk(folder: Path, suffixes: tuple[str, ...] | None = None) -> _Walk:
    """The walk behind ``walk_files``. Folders reached through fewer symlinks claim their real directory
    first (all real subfolders, then through one symlink, ...), so a link to a folder that is also
    listed directly is the one reported, whatever the names."""
    try:
        root_st = os.stat(folder)
    except OSError as e:
        raise RaeError(f"cannot read folder {folder}: {e.strerror}") from None
    root_key = (root_st.st_dev, root_st.st_ino)
    seen: dict[tuple[int, int], tuple[str, ...]] = {}  # real directory -> the path that walked it
    files, skipped, top = [], [], {}
    phase = [((), root_key)]
    while phase:
        later = []
        stack = phase[::-1]
        while stack:
            parts, key = stack.pop()
            rel = "/".join(parts)
            if key in seen:
                first = seen[key]
                skipped.append((rel, f"repeats folder {'/'.join(first)} (a second link to it)" if first
                                else "repeats the listed folder itself (a symlink loop)"))
                continue
            seen[key] = parts
            path = os.path.join(folder, *parts)
            try:
                with os.scandir(path) as it:
                    entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
            except OSError as e:
                skipped.append((rel, f"unreadable folder ({e.strerror})"))
                continue
            if parts and any(e.name == "manifest.json" for e in entries) and _is_rae_artifact(path):
                skipped.append((rel, "a rae artifact"))
                if len(parts) == 1:
                    del top[parts[0]]
                continue
            subdirs = []
            for e in entries:
                sub = parts + (e.name,)
                if e.is_dir():
                    try:
                        st = e.stat()
                    except OSError as err:
                        skipped.append(("/".join(sub), f"unreadable folder ({err.strerror})"))
                        continue
                    key = (st.st_dev, st.st_ino)
                    if not parts and key != root_key:
                        top[e.name] = True
                    (later if e.is_symlink() else subdirs).append((sub, key))
                    continue
                if suffixes and not e.name.lower().endswith(suffixes):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    skipped.append(("/".join(sub), "dangling symlink" if e.is_symlink() else "vanished while listing"))
                    continue
                except OSError as err:
                    skipped.append(("/".join(sub), f"unreadable ({err.strerror})"))
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((sub, (st.st_size, st.st_mtime_ns)))
                else:
                    skipped.append(("/".join(sub), f"not a regular file ({_file_kind(st.st_mode)})"))
            stack += subdirs[::-1]
        phase = later
    files.sort(key=lambda f: f[0])  # as sorting the full paths did: part by part
    skipped.sort(key=lambda s: s[0].split("/"))
    return _Walk(files, skipped, list(top))


def walk_files(folder: str | os.PathLike, suffixes=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files under ``folder`` (relative posix paths, sorted part by part) and what was left out
    ((relative path, why)), safe against what hangs or pollutes a plain ``os.walk(followlinks=True)``.

    Directory symlinks are followed but each real directory is walked once (a loop or a second link is
    reported); FIFOs, sockets, devices and dangling symlinks are reported, never opened; subfolders that
    are rae artifacts (a manifest.json with "kind") are reported and not entered, the folder itself
    always is. Hidden entries are left out silently. ``suffixes`` keeps names ending (case-insensitively)
    with one of them.
    """
    walk = _walk(Path(folder), tuple(s.lower() for s in suffixes) if suffixes else None)
    return ["/".join(parts) for parts, _ in walk.files], walk.skipped


def list_images(root: str | os.PathLike, limit: int | None = None) -> ImageList:
    """List an ImageNet-layout folder (one subfolder per class) or a flat folder (unlabelled).

    Every visible regular file counts; those that turn out not to be images are skipped at load time
    with a warning, what the walk leaves out is in ``skipped``. ``limit`` keeps ``limit`` files evenly
    spread over the sorted list (so a subset of ImageNet still covers every class).
    """
    root = Path(root)
    if not root.exists():
        raise RaeError(f"input folder does not exist: {root}")
    if not root.is_dir():
        raise RaeError(f"input is not a folder: {root}")
    walk = _walk(root)
    class_names = sorted(walk.top_dirs)
    files, labels, stats, ignored = [], [], [], []
    if class_names:
        index = {name: i for i, name in enumerate(class_names)}
        counts = [0] * len(class_names)
        for parts, st in walk.files:
            if len(parts) == 1:
                ignored.append(parts[0])
                continue
            files.append(os.sep.join(parts))
            labels.append(index[parts[0]])
            stats.append(st)
            counts[index[parts[0]]] += 1
        empty = [name for name, n in zip(class_names, counts) if n == 0]
        if empty:
            why = dict(walk.skipped).get(empty[0])
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise RaeError(f"class folder {root / empty[0]}{more} holds no files{f' ({why})' if why else ''}: "
                           "class indices are the sorted folder names (as torchvision's ImageFolder, which "
                           "refuses empty class folders), so it would shift every later label; remove it or add images")
    else:
        for parts, st in walk.files:
            files.append(os.sep.join(parts))
            labels.append(-1)
            stats.append(st)
    if not files:
        hint = (f" ({len(walk.skipped)} entries skipped, e.g. {walk.skipped[0][0]}: {walk.skipped[0][1]})"
                if walk.skipped else "")
        raise RaeError(f"no files found in {root}{hint} (expected images, in class subfolders or flat)")
    if limit is not None and 0 < limit < len(files):
        keep = np.unique(np.linspace(0, len(files) - 1, limit).round().astype(np.int64))
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
        stats = [stats[i] for i in keep]
    return ImageList(root=root, files=files, labels=labels, class_names=class_names, ignored=sorted(ignored),
                     skipped=walk.skipped, stats=stats)


class BadImage(Exception):
    """A file that cannot be turned into an RGB image; the message says why (one line)."""


class SourceChanged(ArtifactError):
    """A source image differs from the one a store was encoded from: training the decoder on it would
    pair a latent with another image."""


def _utc(ns: int) -> str:
    """A modification time in UTC to the nanosecond (times that differ below a second must read differently)."""
    return datetime.fromtimestamp(ns // 10**9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def _source_changed(path, what: str) -> SourceChanged:
    return SourceChanged(f"{path} {what}: re-encode it with `rae encode ... --overwrite`, or restore the original "
                         "(copies must keep modification times: cp -p, rsync -a)")


def _changed(path, expect, size: int, mtime_ns: int) -> SourceChanged:
    return _source_changed(path, f"changed since it was encoded (size {expect[0]} -> {size} bytes, modified at "
                                 f"{_utc(mtime_ns)} vs {_utc(expect[1])} recorded)")


def check_sources(root: str | os.PathLike, files: list[str], stats, progress_label: str | None = None) -> None:
    """Raise ``SourceChanged`` for the first of ``files`` (in list order) that is missing or whose size
    or modification time differ from ``stats`` ((st_size, st_mtime_ns) each), without opening any:
    the decoder trains on a store's source images, which must still be the ones encoded. Stats run
    on threads, since on a network filesystem each one is a round trip."""
    root = str(root)
    if len(files) != len(stats):
        raise ValueError("files and stats differ in length")
    chunk = 256
    starts = range(0, len(files), chunk)

    def check(start: int):
        for i in range(start, min(start + chunk, len(files))):
            path = os.path.join(root, files[i])
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return _source_changed(path, "is missing (deleted or moved since it was encoded)")
            except OSError as e:
                return _source_changed(path, f"cannot be read since it was encoded ({e.strerror})")
            if (st.st_size, st.st_mtime_ns) != tuple(stats[i]):
                return _changed(path, stats[i], st.st_size, st.st_mtime_ns)
        return None

    if progress_label is None:
        bar = contextlib.nullcontext(lambda n=1: None)
    else:

        bar = progress(len(files), progress_label, unit="file")
    with bar as advance, ThreadPoolExecutor(max_workers=max(1, min(32, len(starts)))) as pool:
        for start, error in zip(starts, pool.map(check, starts)):
            if error is not None:
                pool.shutdown(wait=False, cancel_futures=True)
                raise error
            advance(min(chunk, len(files) - start))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and 32-bit integer greyscale are rescaled, not clipped;
    alpha is dropped (as torchvision's loader does, which the reference pipeline uses)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(path: str | os.PathLike, min_size: int = 16, expect: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode and convert one image; raise BadImage (one-line reason) if impossible.

    Never blocks on a FIFO or device (opened non-blocking, refused unless a regular file). With
    ``expect`` ((st_size, st_mtime_ns) recorded when encoded), a file that differs raises SourceChanged.
    """
    try:
        fd, st = _open_nonblocking(path)
    except FileNotFoundError:
        raise BadImage("missing: deleted or moved since it was listed") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or type(e).__name__}") from None
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(st.st_mode):
                raise BadImage(f"not a regular file ({_file_kind(st.st_mode)})")
            if expect is not None and (st.st_size, st.st_mtime_ns) != tuple(expect):
                raise _changed(path, expect, st.st_size, st.st_mtime_ns)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF / palette chatter
                with Image.open(f) as im:
                    im.load()
                    img = to_rgb(im)
    except UnidentifiedImageError:
        raise BadImage("not an image (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if min(img.size) < min_size:
        raise BadImage(f"too small ({img.size[0]}x{img.size[1]}, need at least {min_size} px per side)")
    return img


def box_halve(img: Image.Image, image_size: int) -> Image.Image:
    """The first step of the ADM crop: halve with a box filter while the short side >= 2x target."""
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def _adm_geometry(w: int, h: int, image_size: int) -> tuple[int, int, int, int]:
    """The ADM rule on a box-halved image: the bicubic target size and the crop's offsets (nw, nh, left, top)."""
    scale = image_size / min(w, h)
    nw, nh = round(w * scale), round(h * scale)
    return nw, nh, (nw - image_size) // 2, (nh - image_size) // 2


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
    """The ADM center crop (DiT, ADM and the RAE reference use it): halve with a box filter while
    the short side is at least twice the target, resize the short side to the target with bicubic,
    then cut the central square. Returns uint8 [image_size, image_size, 3]."""
    img = box_halve(img, image_size)
    nw, nh, left, top = _adm_geometry(*img.size, image_size)
    arr = np.asarray(img.resize((nw, nh), resample=Image.BICUBIC))
    return arr[top: top + image_size, left: left + image_size].copy()


def load_crop(path: str | os.PathLike, image_size: int, min_size: int = 16) -> np.ndarray:
    return center_crop_arr(load_rgb(path, min_size=min_size), image_size)


# ---- The authors' decoder-training crop (``train_stage1.py``'s ``stage1_transform``) --------------
def first_resize(image_size: int) -> int:
    """The short side the reference resizes to before its random crop: 384 for 256, 1.5x otherwise."""
    return 384 if image_size == 256 else int(image_size * 1.5)


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """torchvision's ``Resize(short, BICUBIC)`` on a PIL image: the short side to ``short``, the long
    side to ``int(short * long / short_side)`` (truncated, as torchvision computes it), Pillow bicubic."""
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img if size == img.size else img.resize(size, resample=Image.BICUBIC)


def crop_offsets(height: int, width: int, image_size: int, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(top, left) of a random ``image_size`` crop of a ``height`` x ``width`` image, drawn from a
    generator of its own seeded by (seed, epoch, index): the same crop whatever the batch, the number
    of processes or a resume. (The reference's RandomCrop draws from the global torch generator.)"""
    rng = np.random.default_rng([seed, epoch, index, 0x5EED])
    return int(rng.integers(0, height - image_size + 1)), int(rng.integers(0, width - image_size + 1))


def reference_crop(img: Image.Image, image_size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """The reference's decoder-training view of an image: the short side resized to
    ``first_resize(image_size)`` with bicubic, then a random ``image_size`` crop (no flip). Returns
    uint8 [image_size, image_size, 3]."""
    img = resize_short_side(img, first_resize(image_size))
    top, left = crop_offsets(img.size[1], img.size[0], image_size, seed, epoch, index)
    return np.asarray(img.crop((left, top, left + image_size, top + image_size))).copy()


# ---- The ADM crop's bicubic step, exactly, as batched matrix products (on the GPU) --------------
# Pillow resizes 8-bit images with fixed-point coefficients (22 fractional bits) in two passes,
# horizontal then vertical (or, from Pillow 13, vertical first for images that shrink much more in
# height), each rounded and clipped to 8 bits. A pass is a banded matrix product
# whose integer sums stay far below 2^53, so float64 arithmetic reproduces Pillow bit for bit. The
# split: a decoding worker box-halves, computes Pillow's coefficients of the crop's S rows and S
# columns only (``banded_crop``) and ships just the input pixels they read; the GPU expands the bands
# into dense matrices and runs both passes for the whole batch (``bicubic_crop_batch``).
_PRECISION_BITS = 32 - 8 - 2
# Pillow 13 runs the vertical pass first when the height loses more than twice as many pixels as the
# width (python-pillow/Pillow#9549, ``ImagingResampleInner``); earlier versions always start horizontally.
_VERTICAL_FIRST_RULE = int(PIL_VERSION.split(".")[0]) >= 13


def _bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5): the same operations in the same order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=1024)  # photo collections repeat a few hundred sizes; arrays are read-only
def _pil_taps(in_size: int, out_size: int, start: int, count: int):
    """Pillow's fixed-point bicubic coefficients (``precompute_coeffs``, then ``normalize_coeffs_8bpc``)
    of outputs ``start .. start + count`` of an ``in_size -> out_size`` resize, in banded form.

    Returns ``(lo, hi, first, coef)``: those outputs read inputs ``lo .. hi`` only, and output j is
    ``sum_k coef[j, k] * input[lo + first[j] + k]`` (first int64 [count], coef int32 [count, K], zero
    padded). Pillow skips a pass whose size is unchanged: here that is one tap of weight 1.0, which the
    pass's rounding leaves exact.
    """
    if in_size == out_size:
        first, coef = np.arange(count, dtype=np.int64), np.full((count, 1), 1 << _PRECISION_BITS, np.int32)
        first.flags.writeable = coef.flags.writeable = False
        return start, start + count, first, coef
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    center = (np.arange(start, start + count) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # astype truncates like C's (int)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin  # taps per output
    taps = np.arange(int(xmax.max()))
    w = _bicubic_filter((taps + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w[taps >= xmax[:, None]] = 0.0
    total = np.zeros(count)
    for k in range(len(taps)):  # summed in Pillow's order (numpy's pairwise sum may differ in the last bit)
        total += w[:, k]
    np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    coef = (w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)  # rounds half away from 0
    lo = int(xmin.min())
    first = xmin - lo
    first.flags.writeable = coef.flags.writeable = False
    return lo, int((xmin + xmax).max()), first, coef


class BandedCrop(NamedTuple):
    """One image's ADM crop, still to be computed (by ``bicubic_crop_batch``): the box-halved input
    window that the crop reads, and Pillow's banded coefficients of the crop's S rows and S columns.
    Passes run along rows first (Pillow's horizontal pass); where Pillow starts with the vertical pass,
    the window is stored transposed (``transposed``), which makes its first pass a row pass too."""
    pixels: np.ndarray     # uint8 [h, w, 3]
    row_first: np.ndarray  # int64 [S]: first window row read by each output row
    row_coef: np.ndarray   # int32 [S, Kr]
    col_first: np.ndarray  # int64 [S]
    col_coef: np.ndarray   # int32 [S, Kc]
    transposed: bool


def banded_crop(img: Image.Image, image_size: int) -> BandedCrop:
    """The CPU half of ``center_crop_arr`` for ``bicubic_crop_batch``: box-halve, then the coefficients
    of only the output rows and columns inside the crop, and only the input pixels they read."""
    img = box_halve(img, image_size)
    w, h = img.size
    nw, nh, left, top = _adm_geometry(w, h, image_size)
    x0, x1, col_first, col_coef = _pil_taps(w, nw, left, image_size)
    y0, y1, row_first, row_coef = _pil_taps(h, nh, top, image_size)
    pixels = np.asarray(img.crop((x0, y0, x1, y1)))
    if _VERTICAL_FIRST_RULE and 0 < h - nh and 2 * (w - nw) < h - nh:
        return BandedCrop(pixels.transpose(1, 0, 2), col_first, col_coef, row_first, row_coef, True)
    return BandedCrop(pixels, row_first, row_coef, col_first, col_coef, False)


class CropBatch(NamedTuple):
    """The ``BandedCrop``s of a batch: windows padded into one uint8 canvas, coefficients zero-padded
    to the batch's widest band. A loading worker writes the canvas in place into the loader's buffer
    and packs the small arrays after it (``pack_crop_batch``), so one copy takes all to the GPU.
    ``to(device)`` makes them all tensors there."""
    pixels: Any              # uint8 [B, H, W, 3] (numpy or torch)
    row_first: Any           # int64 [B, S]
    row_coef: Any            # int32 [B, S, Kr]
    col_first: Any           # int64 [B, S]
    col_coef: Any            # int32 [B, S, Kc]
    transposed: Any          # bool [B]

    def to(self, device) -> CropBatch:
        import torch

        return CropBatch(*(torch.as_tensor(t).to(device, non_blocking=True) for t in self))


def stack_crops(crops: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """uint8 crops [S, S, 3] (``center_crop_arr``) -> one uint8 array [B, S, S, 3], in ``out`` (a flat
    uint8 buffer of at least that size, e.g. a loader's shared buffer) or a new array."""
    shape = (len(crops), *crops[0].shape)
    batch = np.empty(shape, np.uint8) if out is None else out[: math.prod(shape)].reshape(shape)
    return np.stack(crops, out=batch)


def finished_crop(crop: np.ndarray) -> BandedCrop:
    """A crop already computed (``center_crop_arr``) as a ``BandedCrop`` with identity coefficients:
    one tap of weight 1.0 per output, which both passes return exactly."""
    s = crop.shape[0]
    _, _, first, coef = _pil_taps(s, s, 0, s)
    return BandedCrop(crop, first, coef, first, coef, False)


def canvas_bytes(crops: list[BandedCrop]) -> int:
    """Bytes of the padded uint8 canvas [B, H, W, 3] that ``collate_banded`` fills for ``crops``."""
    return len(crops) * max(c.pixels.shape[0] for c in crops) * max(c.pixels.shape[1] for c in crops) * 3


def fit_banded(crops: list[BandedCrop], images: list[Image.Image], image_size: int, capacity: int) -> list[BandedCrop]:
    """Make the batch's canvas fit ``capacity`` bytes: while it does not, the windows that set its
    height or width are replaced by their finished crops, computed here with Pillow (bit-identical
    either way; only the CPU cost moves). ``capacity`` must hold the finished crops of the batch."""
    if capacity < len(crops) * image_size * image_size * 3:
        raise ValueError("the buffer cannot hold even the finished crops of this batch")
    crops, finished = list(crops), [False] * len(crops)
    while canvas_bytes(crops) > capacity:
        h = max(c.pixels.shape[0] for c in crops)
        w = max(c.pixels.shape[1] for c in crops)
        for i, c in enumerate(crops):
            if not finished[i] and (c.pixels.shape[0] == h or c.pixels.shape[1] == w):
                crops[i], finished[i] = finished_crop(center_crop_arr(images[i], image_size)), True
    return crops


def collate_banded(crops: list[BandedCrop], out: np.ndarray | None = None) -> CropBatch:
    """``BandedCrop``s -> one ``CropBatch`` whose canvas is a numpy array in ``out`` (a flat uint8
    buffer of at least ``canvas_bytes(crops)``, e.g. a loader's shared buffer) or a new array."""
    b = len(crops)
    h = max(c.pixels.shape[0] for c in crops)
    w = max(c.pixels.shape[1] for c in crops)
    canvas = np.empty((b, h, w, 3), np.uint8) if out is None else out[: b * h * w * 3].reshape(b, h, w, 3)
    for i, c in enumerate(crops):
        ch, cw = c.pixels.shape[:2]
        canvas[i, :ch, :cw] = c.pixels
        canvas[i, :ch, cw:] = 0  # padding only meets zero coefficients; zeroed all the same (no stale bytes)
        canvas[i, ch:] = 0

    def band(first, coef):
        out = np.zeros((b, *coef[0].shape[:1], max(k.shape[1] for k in coef)), np.int32)
        for i, k in enumerate(coef):
            out[i, :, : k.shape[1]] = k
        return np.stack(first).astype(np.int64), out

    return CropBatch(canvas, *band([c.row_first for c in crops], [c.row_coef for c in crops]),
                     *band([c.col_first for c in crops], [c.col_coef for c in crops]),
                     np.array([c.transposed for c in crops], dtype=bool))


# Taps per output of Pillow's bicubic filter after box-halving (scale < 2): at most 2 * ceil(2 * 2) + 1.
MAX_TAPS = 12


def crop_batch_extra_bytes(n: int, image_size: int) -> int:
    """Bytes that ``pack_crop_batch`` needs after the canvas for ``n`` images (coefficients, flags)."""
    return n * (image_size * (2 * 8 + 2 * 4 * MAX_TAPS) + 1) + 6 * 8


def pack_crop_batch(batch: CropBatch, out: np.ndarray) -> tuple[tuple, int]:
    """Put the small arrays of ``batch`` into the flat uint8 buffer ``out`` after its canvas (which
    ``collate_banded`` wrote at the start of ``out``), 8-byte aligned, so that one copy takes the whole
    batch to the GPU. Returns the layout for ``unpack_crop_batch`` and the bytes used."""
    layout, offset = [("pixels", "|u1", batch.pixels.shape, 0)], batch.pixels.nbytes
    for name in CropBatch._fields[1:]:
        a = np.ascontiguousarray(getattr(batch, name))
        offset = -(-offset // 8) * 8
        out[offset: offset + a.nbytes] = a.reshape(-1).view(np.uint8)
        layout.append((name, a.dtype.str, a.shape, offset))
        offset += a.nbytes
    return tuple(layout), offset


def unpack_crop_batch(data, layout) -> CropBatch:
    """The ``CropBatch`` that ``pack_crop_batch`` laid out, as views of the uint8 tensor ``data``."""
    import torch

    dtypes = {"|u1": torch.uint8, "<i8": torch.int64, "<i4": torch.int32, "|b1": torch.bool}
    parts = []
    for _, dtype, shape, offset in layout:
        dt = dtypes[dtype]
        nbytes = math.prod(shape) * dt.itemsize
        parts.append(data[offset: offset + nbytes].view(dt).view(shape))
    return CropBatch(*parts)


def _band_matrix(first, coef, size: int):
    """Dense float64 [B, S, size] coefficient matrices from banded ones, built on their device."""
    import torch

    b, s, k = coef.shape
    # A zero-padded tap may point past the input: clamped, it adds 0.0 to a coefficient, which is exact.
    idx = (first[..., None] + torch.arange(k, device=first.device)).clamp_(max=size - 1)
    return torch.zeros(b, s, size, dtype=torch.float64, device=coef.device).scatter_add_(2, idx, coef.to(torch.float64))


def _pil_round(acc):
    """The end of a Pillow pass, exactly in float64: (acc + 2^21) >> 22, clipped to 0..255."""
    return acc.add_(1 << (_PRECISION_BITS - 1)).mul_(1.0 / (1 << _PRECISION_BITS)).floor_().clamp_(0, 255)


def bicubic_crop_batch(batch: CropBatch, chunk: int | None = None):
    """The bicubic resize and center crop of the ADM rule for a ``CropBatch``, on its device and
    bit-identical to ``center_crop_arr``: Pillow's two passes (along the rows of each window, then
    along its columns; transposed windows are transposed back at the end) as batched float64 matrix
    products, ``chunk`` images at a time. Returns uint8 [B, 3, S, S]. Work per batch and chunk, none
    per image, and nothing that waits for the device. (One gather per filter tap in Pillow's int32
    arithmetic, the other exact way, measured slower: 72 vs 35 us per image on an H100.)"""
    import torch

    batch = batch.to(batch.pixels.device)  # the small arrays as tensors beside the pixels
    b, h, w, _ = batch.pixels.shape
    s = batch.row_first.shape[1]
    chunk = chunk or max(1, min(64, (1 << 26) // (3 * h * w)))  # at most ~512 MiB of float64 input at once
    out = torch.empty(b, 3, s, s, dtype=torch.uint8, device=batch.pixels.device)
    for i in range(0, b, chunk):
        part = slice(i, i + chunk)
        n = min(chunk, b - i)
        # Horizontal: [n, S, W] @ [n, W, 3H], the window laid out as columns x (channel, row).
        x = batch.pixels[part].permute(0, 2, 3, 1).to(torch.float64, memory_format=torch.contiguous_format)
        y = _pil_round(torch.bmm(_band_matrix(batch.col_first[part], batch.col_coef[part], w), x.view(n, w, 3 * h)))
        # Vertical: [n, S * 3, H] @ [n, H, S]; rows outside the crop's support meet zero coefficients.
        rows = _band_matrix(batch.row_first[part], batch.row_coef[part], h).transpose(1, 2)
        z = _pil_round(torch.bmm(y.view(n, s * 3, h), rows))  # [n, (column, channel), row]
        out[part] = z.view(n, s, 3, s).permute(0, 2, 3, 1)
    return torch.where(batch.transposed.view(b, 1, 1, 1), out.transpose(2, 3), out)
