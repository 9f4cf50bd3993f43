"""Image folders in, uint8 crops out: listing, robust loading and the ADM center crop."""
from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL import __version__ as PIL_VERSION

from .errors import RaeError

# Decompression-bomb guard stays on, but at a size real photographs never reach.
Image.MAX_IMAGE_PIXELS = 400_000_000


@dataclass
class ImageList:
    root: Path
    files: list[str]           # paths relative to root, sorted
    labels: list[int]          # class index (sorted folder names, as torchvision's ImageFolder) or -1
    class_names: list[str]     # empty for a flat folder
    ignored: list[str]         # files at the root of a class-layout folder (not part of any class)

    def content_id(self) -> str:
        """Digest of the file list with sizes: a changed folder is detected on resume."""
        h = hashlib.sha256()
        for rel in self.files:
            h.update(f"{rel}\t{os.path.getsize(self.root / rel)}\n".encode())
        return h.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(out)


def list_images(root: str | os.PathLike, limit: int | None = None) -> ImageList:
    """List an ImageNet-layout folder (one subfolder per class) or a flat folder (unlabelled).

    Every visible file counts; those that turn out not to be images are skipped at load time with
    a warning. ``limit`` keeps ``limit`` files evenly spread over the sorted list (so a subset of
    ImageNet still covers every class).
    """
    root = Path(root)
    if not root.exists():
        raise RaeError(f"input folder does not exist: {root}")
    if not root.is_dir():
        raise RaeError(f"input is not a folder: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels, ignored = [], [], []
    if subdirs:
        class_names = [d.name for d in subdirs]
        for idx, d in enumerate(subdirs):
            for f in _visible_files(d):
                files.append(str(f.relative_to(root)))
                labels.append(idx)
        ignored = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    else:
        class_names = []
        for f in _visible_files(root):
            files.append(str(f.relative_to(root)))
            labels.append(-1)
    if not files:
        raise RaeError(f"no files found in {root} (expected images, in class subfolders or flat)")
    if limit is not None and 0 < limit < len(files):
        keep = np.unique(np.linspace(0, len(files) - 1, limit).round().astype(np.int64))
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
    return ImageList(root=root, files=files, labels=labels, class_names=class_names, ignored=sorted(ignored))


class BadImage(Exception):
    """A file that cannot be turned into an RGB image; the message says why (one line)."""


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


def load_rgb(path: str | os.PathLike, min_size: int = 16) -> Image.Image:
    """Open, fully decode and convert one image; raise BadImage (one-line reason) if impossible."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF / palette chatter
            with Image.open(path) as im:
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
