"""``rae crop``: an image folder -> the ADM center crops that `rae encode` encodes, as a rae image
folder (``NNNNNN.png`` for entry i of the sorted listing, ``samples.npz``, ``grid.png``): what the
authors' ``pack_images.py`` makes of the originals, so that reconstructions (`rae decode` of a store
encoded without ``--flip``) and originals are scored on the same crops, pair by pair
(`rae eval RECON --ref CROPS --pairs`: rFID, PSNR, SSIM, LPIPS). Files that are not readable images
are skipped as `rae encode` skips them, so the numbering matches its entries. Resumable: a rerun keeps
the PNGs already written."""
from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts.atomic import jsonable, remove_temporaries
from .artifacts.image_folder import GRID, NPZ, png_name, write_grid, write_npz, write_png
from .artifacts.images import BadImage, ImageList, center_crop_arr, list_images, load_rgb
from .artifacts.manifest import (claim_output, describe_difference, digest_json, new_manifest, read_manifest,
                                 resume_if_same, write_manifest)
from .artifacts.outputs import stage
from .errors import RaeError
from .options import AT_LEAST_1, check_options, option
from .progress import console, progress

SKIPPED = "skipped.txt"


@dataclass
class CropConfig:
    images: str = option(help="Image folder: one subfolder per class (ImageNet layout) or flat.", path=True,
                         argument=True)
    out: str = option(help="Output image folder (NNNNNN.png, samples.npz, grid.png).", short="-o", path=True)
    image_size: int = option(256, "ADM center-crop size (any size `rae encode` takes).",
                             check=(lambda v: v >= 16, "at least 16"))
    min_size: int = option(16, "Skip images whose short side is below this (as `rae encode`).", check=AT_LEAST_1)
    limit: int | None = option(None, "Crop N images, evenly spread over the sorted list (as `rae encode`).",
                               check=AT_LEAST_1)
    num_workers: int = option(-1, "Image decoding processes (-1: one per core).")
    overwrite: bool = option(False, "Replace a folder made from other images or settings.")

    RUN_ONLY = ("num_workers", "overwrite", "out")

    def identity(self) -> dict:
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY}


def _crop_chunk(root: str, files: list[str], ids: list[int], image_size: int, min_size: int, out: str) -> list:
    """A worker's share: each image's ADM crop written as its entry's PNG; returns the skipped ones."""
    skipped = []
    for i in ids:
        try:
            write_png(Path(out) / png_name(i), center_crop_arr(load_rgb(Path(root) / files[i], min_size), image_size))
        except BadImage as e:
            skipped.append((i, str(e)))
    return skipped


def _prepare(cfg: CropConfig, listing: ImageList) -> str:
    out = Path(cfg.out)
    wanted = digest_json({"config": cfg.identity(), "images": listing.content_id()})
    state = claim_output(out, cfg.overwrite, resume_if_same("image-folder", wanted),
                         different=lambda old: describe_difference(out, cfg, old, {"images": listing.content_id()}),
                         foreign=f"{out} exists and is not a rae image folder; choose another --out")
    if state:
        return state
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, new_manifest("image-folder", cfg, inputs={"images": {
        "kind": "image-folder", "path": str(listing.root.resolve()), "content_id": listing.content_id()}},
        identity=wanted, crop="adm-center-crop", image_size=cfg.image_size, npz=NPZ, grid=GRID))
    return "new"


def _read_skipped(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        return []
    return [(int(i), why) for i, _, why in (line.partition("\t") for line in path.read_text().splitlines() if line)]


@stage
def run(cfg: CropConfig) -> dict:
    check_options(cfg)
    listing = list_images(cfg.images, cfg.limit)
    out = Path(cfg.out)
    state = _prepare(cfg, listing)
    if state == "done":
        console.print(f"{out} is already complete; nothing to do.", highlight=False)
        return summary(out)
    skipped_file = out / SKIPPED
    known_bad = dict(_read_skipped(skipped_file))
    todo = [i for i in range(len(listing.files)) if i not in known_bad and not (out / png_name(i)).is_file()]
    workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, os.cpu_count() or 1)
    chunks = [todo[s: s + 64] for s in range(0, len(todo), 64)]
    skipped: list[tuple[int, str]] = []
    with progress(len(todo), "crop", unit="img") as advance:
        if workers <= 1 or len(chunks) <= 1:
            for ids in chunks:
                skipped += _crop_chunk(str(listing.root), listing.files, ids, cfg.image_size, cfg.min_size, str(out))
                advance(len(ids))
        else:
            with cf.ProcessPoolExecutor(max_workers=workers) as pool:
                jobs = {pool.submit(_crop_chunk, str(listing.root), listing.files, ids, cfg.image_size, cfg.min_size,
                                    str(out)): len(ids) for ids in chunks}
                for job in cf.as_completed(jobs):
                    skipped += job.result()
                    advance(jobs[job])
    for i, why in skipped:
        console.print(f"[yellow]warning:[/] skipping {listing.files[i]}: {why}", highlight=False)
    bad = {**known_bad, **dict(skipped)}
    if skipped:
        with open(skipped_file, "a") as f:  # the kept record of unreadable files, for a resumed run
            f.writelines(f"{i}\t{why}\n" for i, why in skipped)
    indices = np.array([i for i in range(len(listing.files)) if i not in bad], dtype=np.int64)
    if len(indices) == 0:
        raise RaeError(f"no readable image in {cfg.images}: all {len(bad)} files were skipped")
    labels = np.asarray(listing.labels, dtype=np.int64)[indices]
    labels = labels if (labels >= 0).any() else None
    write_npz(out / NPZ, out, indices, labels)
    write_grid(out / GRID, out, indices, labels)
    remove_temporaries(out)
    manifest = read_manifest(out, require_complete=False)
    manifest.update(num_images=len(indices), image_shape=[cfg.image_size, cfg.image_size, 3],
                    labelled=labels is not None, files=[png_name(int(indices[0])), png_name(int(indices[-1]))],
                    skipped_files=[[listing.files[i], why] for i, why in sorted(bad.items())],
                    content_id=digest_json({"identity": manifest["identity"], "n": len(indices)}), complete=True)
    write_manifest(out, manifest)
    return summary(out)


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="image-folder", what="image folder")
    return {"folder": str(out), "images": manifest["num_images"], "image_shape": manifest["image_shape"],
            "skipped": len(manifest.get("skipped_files", [])), "npz": str(Path(out) / NPZ),
            "grid": str(Path(out) / GRID)}
