"""``rae encode``: an image folder -> a Zarr latent store with exact statistics.

Each source image is loaded (robustly: anything PIL can read becomes RGB, the rest is skipped and
listed), ADM-center-cropped to ``image_size`` and run through the frozen encoder; with ``flip``
its horizontal mirror is encoded too (an encoded mirror, not a mirrored latent). Work proceeds in
blocks (see ``stages.artifacts.store``): resumable, shared between ``torchrun`` ranks, and bit-identical to a
single-process run.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import dist
from .artifacts.atomic import jsonable
from .artifacts.images import (BadImage, banded_crop, bicubic_crop_batch, center_crop_arr, collate_banded,
                               crop_batch_extra_bytes, fit_banded, list_images, load_rgb, pack_crop_batch, stack_crops,
                               unpack_crop_batch)
from .artifacts.loader import SlotLoader
from .artifacts.manifest import (claim_output, create_artifact_dir, describe_difference, digest_json, new_manifest,
                                 read_manifest, resume_if_same, write_manifest)
from .artifacts.outputs import stage
from .artifacts.store import CODECS, LatentStore, Moments, claim_blocks, remove_store
from .errors import RaeError
from .models.encoders import build_encoder, encoder_identity, spec_for
from .options import AT_LEAST_1, check_options, option, precision_option
from .progress import console, progress

SOURCES = "sources.txt"
# (size, mtime_ns) int64 [images, 2] of each source when listed: the decoder reads the images again later.
SOURCE_STATS = "source_stats.npy"


@dataclass
class EncodeConfig:
    data: str = option(help="Image folder: one subfolder per class (ImageNet layout) or flat.", path=True, argument=True)
    out: str = option(help="Output latent store (a .zarr directory).", short="-o", path=True)
    encoder: str = option("dinov2-b", "dinov2-s | dinov2-b | dinov2-l | siglip2-b | mae-b | dinov2-demo | "
                          "timm:MODEL_NAME (any timm ViT, e.g. timm:vit_base_patch16_dinov3).")
    encoder_weights: str | None = option(None, "Local encoder checkpoint (else timm's pretrained weights).", path=True)
    random_init: bool = option(False, "Random encoder weights from --seed (tests, demos).")
    seed: int = option(0, "Seed for --random-init.")
    image_size: int = option(256, "ADM center-crop size: 256 or 512.", check=(lambda v: v >= 16, "at least 16"))
    flip: bool = option(False, "Also encode each image's horizontal mirror.")
    limit: int | None = option(None, "Encode N images, evenly spread over the sorted list.", check=AT_LEAST_1)
    dtype: str = option("float16", "Stored latent dtype: float16 or float32.", choices=("float16", "float32"))
    codec: str = option("blosc-zstd", "Compressor: blosc-zstd | blosc-lz4 | none.", choices=CODECS)
    shard_size: int = option(64, "Entries per Zarr shard file.", check=AT_LEAST_1)
    block_size: int = option(1024, "Entries per unit of work and resume.", check=AT_LEAST_1)
    min_size: int = option(16, "Skip images whose short side is below this.", check=AT_LEAST_1)
    precision: str = precision_option()
    # Bit-identical either way: not part of the identity.
    resize: str = option("auto", "Where the crop's bicubic step runs: auto (gpu on CUDA, else cpu) | gpu (on the "
                         "encoder's device, bit-identical to Pillow; half the worker CPU per image) | cpu (Pillow in "
                         "the loading workers).", choices=("auto", "cpu", "gpu"))
    # Run settings: they do not change the store, so a resume may change them.
    batch_size: int = option(256, "Images per encoder batch.", check=AT_LEAST_1)
    num_workers: int = option(-1, "Image decoding processes (-1: one per core, less two).")
    device: str = option("auto", "auto | cuda | cpu.")
    compile: bool = option(False, "torch.compile the encoder.")
    # One launch instead of hundreds: the main thread, not the GPU, was the limit.
    cuda_graph: bool = option(True, "Replay full batches (on CUDA) as a captured CUDA graph.")
    overwrite: bool = option(False, "Replace a store made with another configuration.")

    RUN_ONLY = ("batch_size", "num_workers", "device", "compile", "cuda_graph", "overwrite", "out", "resize")

    def identity(self) -> dict:
        """The fields that define the store's content (compared on resume)."""
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY}


def _validate(cfg: EncodeConfig) -> None:
    check_options(cfg)
    spec_for(cfg.encoder)
    if cfg.image_size not in (256, 512) and cfg.encoder != "dinov2-demo" and not cfg.random_init:
        raise RaeError(f"--image-size must be 256 or 512 (got {cfg.image_size})")
    if cfg.shard_size < 2 or cfg.shard_size % 2 or cfg.block_size % cfg.shard_size:
        raise RaeError("the shard size must be even and divide the block size")


class _LoadChunk:
    """A loading worker's job (``stages.artifacts.loader``): the images of one chunk, ADM-cropped, into a buffer.

    A bad file becomes a flagged black image. Written into ``out``: Pillow's uint8 crops [n, S, S, 3],
    or with ``resize_on_device`` a packed ``CropBatch`` (the worker only decodes, box-halves and
    computes the coefficients; the bicubic resize and crop run on the encoder's device, bit-identical
    to Pillow, because Pillow's bicubic resize costs more CPU than the JPEG decode). Returns
    ``((layout, ok flags, reasons), bytes written)``.
    """

    def __init__(self, root: Path, files: list[str], image_size: int, min_size: int, resize_on_device: bool = False):
        self.root, self.files, self.size, self.min_size = root, files, image_size, min_size
        self.resize_on_device = resize_on_device

    def __call__(self, ids: list[int], out: np.ndarray):
        images, ok, reasons = [], [], []
        for i in ids:
            try:
                images.append(load_rgb(self.root / self.files[i], self.min_size))
                ok.append(True)
                reasons.append("")
            except BadImage as e:
                images.append(Image.new("RGB", (self.size, self.size)))
                ok.append(False)
                reasons.append(str(e))
        if self.resize_on_device:
            room = out.nbytes - crop_batch_extra_bytes(len(ids), self.size)
            crops = fit_banded([banded_crop(im, self.size) for im in images], images, self.size, room)
            layout, nbytes = pack_crop_batch(collate_banded(crops, out), out)
        else:
            layout = stack_crops([center_crop_arr(im, self.size) for im in images], out).shape
            nbytes = math.prod(layout)
        return (layout, np.array(ok, dtype=bool), reasons), nbytes


def chunk_images(image_size: int) -> int:
    """Images per loading task: 64 at 256 px and below, fewer for larger crops (buffers stay ~52 MB)."""
    return max(4, min(64, 64 * 256 * 256 // (image_size * image_size)))


def chunk_bytes(image_size: int) -> int:
    """A loading buffer: the canvas of a chunk of box-halved windows (each at most about (2S)^2
    pixels, typically ~2.2 S^2 for ImageNet photographs; a larger canvas is cropped by the worker),
    and the chunk's coefficients."""
    n = chunk_images(image_size)
    return n * int(4.2 * image_size * image_size) * 3 + crop_batch_extra_bytes(n, image_size)


def _crops_on_device(data: torch.Tensor, layout) -> torch.Tensor:
    """uint8 [n, 3, S, S] crops from a chunk's bytes on the encoder's device (the loader put them
    there) and its layout. No per-image work and no host sync."""
    if isinstance(layout, tuple) and isinstance(layout[0], tuple):  # a packed CropBatch
        return bicubic_crop_batch(unpack_crop_batch(data, layout))
    return data.view(layout).permute(0, 3, 1, 2)


class _GraphedForward:
    """``fn`` on CUDA for inputs of one shape as a captured CUDA graph, eager for any other shape.

    Replaying the graph is one launch where the eager encoder makes hundreds; the kernels are the
    same. Its output buffer is reused by the next replay, so each call returns a copy.
    """

    def __init__(self, fn, shape: tuple[int, ...], device: torch.device):
        self.fn, self.shape, self.device = fn, tuple(shape), device
        self.graph = None

    def _capture(self, x: torch.Tensor) -> None:
        self.static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (lazy initialisations, autotuning) outside the capture
            for _ in range(2):
                self.fn(self.static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            return self.fn(x)
        if self.graph is None:
            self._capture(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def _entries(n_images: int, flip: bool):
    """Entry e of the store -> (source image, mirrored?). With flip: 2i is image i, 2i+1 its mirror."""
    reps = 2 if flip else 1
    src = np.repeat(np.arange(n_images, dtype=np.int64), reps)
    flipped = np.tile(np.array([False, True][:reps]), n_images)
    return src, flipped


def _prepare_store(cfg: EncodeConfig, listing, identity: dict, enc_id: dict) -> str:
    """Rank 0: create, reuse or refuse the output store. Returns "done", "resume" or "new"."""
    out = Path(cfg.out)
    wanted = {"config": identity, "encoder": enc_id, "images": listing.content_id()}
    state = claim_output(out, cfg.overwrite, resume_if_same("latent-store", digest_json(wanted)),
                         different=lambda old: describe_difference(out, cfg, old, {"images": listing.content_id()}),
                         foreign=f"{out} exists and is not a rae latent store; choose another --out",
                         intact=LatentStore)
    if state:
        return state
    n_images = len(listing.files)
    src, flipped = _entries(n_images, cfg.flip)
    labels = np.asarray(listing.labels, dtype=np.int64)[src]
    spec = spec_for(cfg.encoder)
    attrs = {"encoder": enc_id, "image_size": cfg.image_size, "crop": "adm-center-crop",
             "class_names": listing.class_names, "num_classes": len(listing.class_names),
             "flip": cfg.flip, "raw_encoder_space": True}
    manifest = new_manifest("latent-store", cfg, inputs={"images": {"kind": "image-folder", "path": str(listing.root.resolve()),
                                                                    "content_id": listing.content_id()}},
                            identity=digest_json(wanted), encoder=enc_id,
                            latent_shape=list(spec.latent_shape(cfg.image_size)), num_entries=len(src),
                            num_images=n_images, class_names=listing.class_names, sources_file=SOURCES,
                            source_stats_file=SOURCE_STATS, ignored_files=listing.ignored,
                            unlisted_files=[list(s) for s in listing.skipped])

    def build(folder: Path) -> None:
        LatentStore.create(folder, len(src), spec.latent_shape(cfg.image_size), cfg.dtype, labels, src, flipped,
                           attrs, shard_size=cfg.shard_size, block_size=cfg.block_size, codec=cfg.codec)
        (folder / SOURCES).write_text("".join(f + "\n" for f in listing.files))
        np.save(folder / SOURCE_STATS, np.asarray(listing.stats, dtype=np.int64).reshape(-1, 2))
        write_manifest(folder, manifest)

    create_artifact_dir(out, build)
    return "new"


def _report_unlisted(skipped: list, shown: int = 10) -> None:
    """What the listing left out (special files, dangling links, folder loops, rae artifacts)."""
    for rel, why in skipped[:shown]:
        console.print(f"[yellow]warning:[/] not listed: {rel}: {why}", highlight=False, soft_wrap=True)
    if len(skipped) > shown:
        console.print(f"[yellow]warning:[/] ... and {len(skipped) - shown} more (the store's manifest lists them as "
                      "unlisted_files)", highlight=False)


class _BlockWriter:
    """The encoded batches of one block at a time, written in a writer thread once the block is whole.

    Latents leave the GPU batch by batch into pinned memory on a side stream, overlapping the next
    batches' compute (a pageable copy of a whole block would stall the compute stream); each block's
    float64 statistics per shard are computed on that stream too (the CPU is busy decoding images).
    Nothing here waits for the device: the writer thread does, before compressing and writing. At
    most a couple of blocks are in flight, which bounds memory.
    """

    def __init__(self, store: LatentStore, device: torch.device):
        self.store, self.device = store, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = cf.ThreadPoolExecutor(max_workers=2)
        self.in_flight: list[cf.Future] = []
        self.block, self.lat, self.host, self.ok, self.skipped = None, [], [], [], []

    @staticmethod
    def _to_pinned(t: torch.Tensor) -> torch.Tensor:  # on the current stream, without waiting
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    def add(self, block: int, z: torch.Tensor, ok: np.ndarray, skipped: list) -> None:
        """One batch's latents (on the device), validity and skipped files, of ``block``."""
        if self.block is not None and block != self.block:
            self.flush()
        self.block = block
        self.lat.append(z)
        self.host.append(self._copy_to_host(z))
        self.ok.append(ok)
        self.skipped += skipped

    def _copy_to_host(self, z: torch.Tensor) -> torch.Tensor:
        if self.copy_stream is None:
            return z
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            host = self._to_pinned(z)
        z.record_stream(self.copy_stream)
        return host

    def flush(self) -> None:
        """Send the current block to the writer thread."""
        if self.block is None:
            return
        b, lat, host, ok = self.block, torch.cat(self.lat), list(self.host), np.concatenate(self.ok)
        info = {"skipped": list(self.skipped)}
        self.block, self.lat, self.host, self.ok, self.skipped = None, [], [], [], []
        copied, partials = None, None
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            lat.record_stream(self.copy_stream)
            with torch.cuda.stream(self.copy_stream):
                valid = torch.from_numpy(ok).pin_memory().to(self.device, non_blocking=True)
                partials = [self._to_pinned(t) for t in Moments.shard_partials(lat, valid, self.store.shard_size)]
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)

        def write():  # merges, compression and the write, in the writer thread, whose waits stall nothing else
            if copied is None:
                moments = Moments.of_shards(lat, torch.from_numpy(ok), self.store.shard_size)
                data = lat.numpy()
            else:
                copied.synchronize()  # this block's latents and partial statistics have landed
                moments = Moments.merge_partials(*(t.numpy() for t in partials))
                data = torch.cat(host).numpy()
            self.store.write_block(b, data, ok, info, moments)

        self.in_flight.append(self.pool.submit(write))
        while len(self.in_flight) > 2:
            self.in_flight.pop(0).result()

    def finish(self) -> None:
        self.flush()
        for f in self.in_flight:
            f.result()

    def close(self) -> None:
        """On an interruption: block writes in flight finish or are cancelled."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _plan_batches(cfg: EncodeConfig, store: LatentStore, my_blocks: list[int]):
    """This rank's batches: (block, image ids, loading chunks) each, and the loading tasks in order.
    Batches never cross a block boundary, so results do not depend on how blocks are shared out;
    workers load chunks of a batch (a few dozen images each: fine-grained, small buffers)."""
    src = np.asarray(store.source_index[:])
    images_per_batch = max(cfg.batch_size // (2 if cfg.flip else 1), 1)
    batches, tasks = [], []
    for b in my_blocks:
        rng = store.block_range(b)
        imgs = np.unique(src[rng.start: rng.stop])
        for s in range(0, len(imgs), images_per_batch):
            ids = imgs[s: s + images_per_batch]
            parts = np.array_split(ids, -(-len(ids) // chunk_images(cfg.image_size)))
            tasks += [part.tolist() for part in parts]
            batches.append((b, ids.tolist(), len(parts)))
    return batches, tasks


def _encoder_forward(cfg: EncodeConfig, encoder: torch.nn.Module, device: torch.device):
    """The encoder on a uint8 batch -> latents in the store's dtype, as a CUDA graph where it pays."""
    encoder = encoder.to(device)
    if cfg.compile:
        encoder = torch.compile(encoder)
    latent_dtype = torch.float16 if cfg.dtype == "float16" else torch.float32

    def forward(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return encoder(x).to(latent_dtype)

    if device.type == "cuda" and cfg.cuda_graph and not cfg.compile:
        return _GraphedForward(forward, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), device)
    return forward


def _next_batch(loader, n_chunks: int, img_ids: list[int], files: list[str]):
    """A batch's crops on the device from its loading chunks, its validity, and the skipped files."""
    parts, ok, reasons = [], [], []
    for _ in range(n_chunks):
        buf, (layout, part_ok, part_reasons) = next(loader)
        parts.append(_crops_on_device(buf, layout))
        ok.append(part_ok)
        reasons += part_reasons
    x, ok = torch.cat(parts) if len(parts) > 1 else parts[0], np.concatenate(ok)
    skipped = [[files[i], why] for i, good, why in zip(img_ids, ok.tolist(), reasons) if not good]
    for name, why in skipped:
        console.print(f"[yellow]warning:[/] skipping {name}: {why}", highlight=False)
    return x, ok, skipped


@stage
def run(cfg: EncodeConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    # What the manifest records: the precision and resize route used.
    resize = cfg.resize if cfg.resize != "auto" else ("gpu" if d.device.type == "cuda" else "cpu")
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device), resize=resize)
    listing = list_images(cfg.data, cfg.limit)
    if d.is_main:
        _report_unlisted(listing.skipped)
    encoder, digest = build_encoder(cfg.encoder, cfg.image_size, weights=cfg.encoder_weights,
                                    pretrained=not cfg.random_init, seed=cfg.seed)
    enc_id = encoder_identity(cfg.encoder, cfg.image_size, digest, pretrained=not cfg.random_init)

    out = Path(cfg.out)
    state, store, my_blocks = claim_blocks(out, lambda: _prepare_store(cfg, listing, cfg.identity(), enc_id), d)
    if state == "done":
        return summary(out)
    forward = _encoder_forward(cfg, encoder, d.device)
    batches, tasks = _plan_batches(cfg, store, my_blocks)
    fill = _LoadChunk(listing.root, listing.files, cfg.image_size, cfg.min_size, resize_on_device=cfg.resize == "gpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, min(32, (os.cpu_count() or 2) // local_world - 2))
    # Started (forked) before the writer and progress threads exist.
    loader = SlotLoader(fill, tasks, workers, chunk_bytes(cfg.image_size), d.device, slots=2 * workers + 2).start()
    writer = _BlockWriter(store, d.device)
    total = sum(len(store.block_range(b)) for b in my_blocks)
    t0 = time.time()
    label = "encode" if d.world == 1 else f"encode (rank {d.rank}/{d.world})"
    try:
        with progress(total, label, unit="img") as advance:
            for b, img_ids, n_chunks in batches:
                x, ok, skipped = _next_batch(loader, n_chunks, img_ids, listing.files)
                if cfg.flip:  # entries 2i, 2i+1: the image, then its mirror (encoded as an image)
                    x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
                    ok = np.repeat(ok, 2)
                writer.add(b, forward(x), ok, skipped)
                advance(len(x))
            writer.finish()
    finally:  # on an interruption, stop the loading workers; let block writes in flight finish or be cancelled
        loader.close()
        writer.close()
    elapsed = time.time() - t0
    dist.barrier()
    dist.main_decides(lambda: _finalize(store, out, cfg.data))
    result = summary(out)
    result["seconds"] = elapsed
    result["images_per_second"] = total / elapsed if elapsed > 0 else 0.0
    return result


def _finalize(store: LatentStore, out: Path, data: str) -> None:
    store.require_all_blocks()
    skipped = []
    for b in range(store.num_blocks):
        skipped += store.block_info(b).get("skipped", [])
    if not np.asarray(store.valid[:]).any():  # nothing to keep: not a store that looks interrupted
        remove_store(out)
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise RaeError(f"no readable image in {data}: all {len(skipped)} files were skipped{first}; nothing written")
    store.finish(skipped_files=skipped)


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="latent-store", what="latent store")
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file() and "/latents/" in str(p))
    return {"store": str(out), "entries": manifest["num_entries"], "valid": manifest["num_valid"],
            "skipped": manifest["skipped_files"], "latent_shape": manifest["latent_shape"],
            "bytes_per_entry": size / max(manifest["num_entries"], 1), "encoder": manifest["encoder"]["name"]}
