"""A rae image folder (``rae decode``, ``rae crop``): entry i of its source as ``NNNNNN.png``
(written atomically), the ADM evaluation ``.npz`` assembled from them (arr_0 uint8 [N, H, W, 3] in
index order, arr_1 the labels when there are any) and a preview grid."""
from __future__ import annotations

import concurrent.futures as cf
import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from ..models.decoder import to_uint8
from .atomic import atomic_replace, atomic_write_bytes

NPZ = "samples.npz"
GRID = "grid.png"
GRID_ROW = 8  # images per row of a preview grid


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buffer = io.BytesIO()  # encoded in memory: a write error is then our own OSError, not PIL's state
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    atomic_write_bytes(path, buffer.getbuffer())


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_npz(path: Path, folder: Path, indices: np.ndarray, labels: np.ndarray | None) -> None:
    """ADM ``.npz`` streamed from the PNGs (never all images in memory): arr_0 uint8 [N, H, W, 3]."""
    first = read_png(folder / png_name(int(indices[0])))
    with atomic_replace(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (len(indices), *first.shape)}
            np.lib.format.write_array_header_1_0(f, header)
            with cf.ThreadPoolExecutor(max_workers=8) as pool:
                for image in pool.map(lambda i: read_png(folder / png_name(int(i))), indices):
                    if image.shape != first.shape:
                        raise ArtifactError(f"{folder}: images of different sizes ({image.shape} vs {first.shape})")
                    f.write(np.ascontiguousarray(image).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels.astype(np.int64))


def write_grid(path: Path, folder: Path, indices: np.ndarray, labels: np.ndarray | None,
               max_rows: int = 16, per_row: int = 8) -> None:
    """Preview: one row per class (the first ``max_rows`` classes present) for labelled stores."""
    if labels is not None and (labels >= 0).all():
        rows = [indices[labels == c][:per_row] for c in np.unique(labels)[:max_rows]]
    else:
        shown = indices[: max_rows * per_row]
        rows = [shown[r: r + per_row] for r in range(0, len(shown), per_row)]
    save_grid(path, [[read_png(folder / png_name(int(i))) for i in row] for row in rows], per_row)


def decode_grid(decoder, z) -> list[list[np.ndarray]]:
    """Raw-space latents -> the decoder's uint8 images in rows of GRID_ROW (a training run's previews:
    the same seeds and classes at every step)."""
    import torch

    device = next(decoder.parameters()).device
    with torch.no_grad():
        images = to_uint8(decoder(z.to(device).float()))
    return [list(images[r: r + GRID_ROW]) for r in range(0, len(images), GRID_ROW)]


def save_grid(path: Path, rows: list[list[np.ndarray]], per_row: int) -> np.ndarray:
    """uint8 [H, W, 3] images in rows of at most ``per_row``, on white, as one PNG (written atomically);
    returns the grid."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    canvas = np.full((len(rows) * h, per_row * w, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * h: (r + 1) * h, c * w: (c + 1) * w] = image
    with atomic_replace(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return canvas
