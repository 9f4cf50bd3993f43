"""Image folders in, uint8 crops out: listing, robust loading and the ADM center crop."""
from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
    """The ADM center crop (DiT, ADM and the RAE reference use it): halve with a box filter while
    the short side is at least twice the target, resize the short side to the target with bicubic,
    then cut the central square. Returns uint8 [image_size, image_size, 3]."""
    img = box_halve(img, image_size)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size].copy()


def load_crop(path: str | os.PathLike, image_size: int, min_size: int = 16) -> np.ndarray:
    return center_crop_arr(load_rgb(path, min_size=min_size), image_size)


# ---- PIL's resampling, exactly, as matrix products (the GPU half of the ADM crop) --------------
# Pillow resizes 8-bit images with fixed-point coefficients (22 fractional bits) in two passes,
# horizontal then vertical, each rounded and clipped to 8 bits. A pass is a banded matrix product
# whose integer sums stay below 2^53, so float64 arithmetic reproduces Pillow bit for bit — on a
# GPU, where decoding workers are free to do nothing but decode. Tested against Pillow.
_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=256)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bicubic coefficients for ``in_size -> out_size`` as a dense [out, in] matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), in_size)
        k = [_bicubic((x - centre + 0.5) / filterscale) for x in range(xmin, xmax)]
        total = sum(k)
        for x, v in zip(range(xmin, xmax), k):
            v = v / total if total != 0.0 else v
            w[xx, x] = math.trunc(v * (1 << _PRECISION_BITS) + (0.5 if v >= 0 else -0.5))
    return w


@functools.lru_cache(maxsize=512)
def _crop_matrix(in_size: int, out_size: int, start: int, size: int, device):
    """The transposed coefficient rows of one crop window, kept on the device (ImageNet has a few
    hundred distinct image sizes; each matrix is built and uploaded once)."""
    import torch

    rows = pil_bicubic_matrix(in_size, out_size)[start: start + size]
    return torch.from_numpy(np.ascontiguousarray(rows.T)).to(device)


def _pil_pass(x, weights):
    """One Pillow pass: integer sum with the rounding constant, then clip to 8 bits."""
    import torch

    acc = torch.matmul(x, weights) + float(1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def bicubic_crop_tensor(images, image_size: int):
    """The bicubic resize and center crop of the ADM rule on uint8 [B, H, W, 3] tensors of one size
    (already box-halved), bit-identical to ``center_crop_arr``. Returns uint8 [B, 3, S, S]."""
    import torch

    b, h, w, _ = images.shape
    scale = image_size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = images.permute(0, 3, 1, 2).to(torch.float64)
    dev = x.device
    # Only the rows and columns inside the crop are computed: each output pixel is independent.
    if nw != w:
        x = _pil_pass(x, _crop_matrix(w, nw, left, image_size, dev))
    else:
        x = x[..., left: left + image_size]
    if nh != h:
        x = _pil_pass(x.transpose(-1, -2), _crop_matrix(h, nh, top, image_size, dev)).transpose(-1, -2)
    else:
        x = x[..., top: top + image_size, :]
    return x.to(torch.uint8)
