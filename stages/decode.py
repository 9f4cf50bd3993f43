"""``rae decode``: any complete latent store (encoded images or generated samples) -> PNGs + ADM ``.npz``.

Decoding an encoded store gives reconstructions (rFID), decoding a sample store gives generations
(gFID): the same command. Output folder::

    IMAGES/000000.png ...   entry i of the store (valid entries only), written atomically
    IMAGES/samples.npz      ADM evaluation format: arr_0 uint8 [N, H, W, 3] in index order
                            (+ arr_1 int64 labels when the store is labelled)
    IMAGES/grid.png         preview: one row per class (labelled stores), else an 8-wide grid
    IMAGES/manifest.json    kind "image-folder", complete last

Pixels: clamp to [0, 1], times 255, then truncation to uint8, exactly as the reference's
``sample_ddp.py`` / ``stage1_sample_ddp.py`` (and ADM) do. A killed run resumes: existing PNGs are
kept, and the ``.npz`` is assembled from the PNGs at the end.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dist
from .artifacts.atomic import jsonable, remove_temporaries
from .artifacts.checkpoint import load_weights
from .artifacts.image_folder import (GRID, GRID_ROW, NPZ, decode_grid, png_name, read_png, save_grid, write_grid,
                                     write_npz, write_png)
from .artifacts.manifest import (claim_output, describe_difference, digest_json, input_ref, new_manifest,
                                 read_manifest, resume_if_same, write_manifest)
from .artifacts.outputs import stage
from .artifacts.runs import check_compatible, load_decoder_run
from .artifacts.store import open_complete_store
from .errors import ArtifactError, RaeError
from .models.decoder import to_uint8
from .options import AT_LEAST_1, NON_NEGATIVE, check_options, option, precision_option
from .progress import console, progress



@dataclass
class DecodeConfig:
    store: str = option(help="A complete latent store (rae encode) or sample store (rae sample); or the EMA samples "
                        "a diffusion run saved while training (RUN/samples/step_N.safetensors), decoded into one "
                        "grid, --out FILE.png.", path=True, argument=True)
    decoder: str = option(help="Decoder run directory (rae train-decoder).", short="-d", path=True)
    out: str = option(help="Output image folder.", short="-o", path=True)
    ema: bool = option(True, "EMA decoder weights (decoder_ema.safetensors) or raw weights (decoder.safetensors).")
    step: int | None = option(None, "Use the weights of this training step (a snapshot or a kept checkpoint) "
                              "instead of the finished run's.", check=(lambda v: v >= 0, "a step, 0 or more"))
    precision: str = precision_option()
    grid_classes: int = option(16, "Preview rows (labelled stores).", check=NON_NEGATIVE, cli=False)
    grid_per_row: int = option(8, "Preview images per row.", check=AT_LEAST_1, cli=False)
    # Run settings: they do not change the images, so a resume may change them.
    batch_size: int = option(128, "Latents per decoder batch.", check=AT_LEAST_1)
    chunk_size: int = option(1024, "Entries per unit of work shared between ranks.", check=AT_LEAST_1, cli=False)
    device: str = option("auto", "auto | cuda | cpu.")
    compile: bool = option(False, "torch.compile the decoder.")
    overwrite: bool = option(False, "Replace a folder made from other inputs.")

    RUN_ONLY = ("batch_size", "chunk_size", "device", "compile", "overwrite", "out", "grid_classes", "grid_per_row")

    def identity(self) -> dict:
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY}


#################################################################################
#                              The decoder's input                              #
#################################################################################

#################################################################################
#                                   Images                                      #
#################################################################################

#################################################################################
#                                    Stage                                      #
#################################################################################

def _prepare_folder(cfg: DecodeConfig, store_manifest: dict, decoder_info: dict) -> str:
    out = Path(cfg.out)
    inputs = {"latents": input_ref(cfg.store, store_manifest),
              "decoder": {**input_ref(cfg.decoder, decoder_info["manifest"]), "content_id": decoder_info["content_id"]}}
    wanted = digest_json({"config": cfg.identity(), "inputs": [v["content_id"] for v in inputs.values()]})
    state = claim_output(out, cfg.overwrite, resume_if_same("image-folder", wanted),
                         different=lambda old: describe_difference(
                             out, cfg, old, {k: v["content_id"] for k, v in inputs.items()}),
                         foreign=f"{out} exists and is not a rae image folder; choose another --out")
    if state == "resume":  # scores of the unfinished folder no longer describe it
        for stale in ("eval.json", Path(NPZ).stem + ".eval.json"):
            (out / stale).unlink(missing_ok=True)
    if state:
        return state
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, new_manifest("image-folder", cfg, inputs=inputs, identity=wanted,
                                     encoder=store_manifest.get("encoder"), npz=NPZ, grid=GRID))
    return "new"


@stage
def run(cfg: DecodeConfig) -> dict:
    check_options(cfg)
    d = dist.init(cfg.device)
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device))  # as the manifest says
    if Path(cfg.store).suffix == ".safetensors":
        return decode_training_samples(cfg, d)
    store_manifest, store = open_complete_store(cfg.store)
    decoder, info = load_decoder_run(cfg.decoder, device=d.device, ema=cfg.ema, step=cfg.step)
    store_encoder = store.attrs.get("encoder") or store_manifest.get("encoder") or {}
    check_compatible(store_encoder, store.latent_shape, info, cfg.decoder)

    state = dist.main_decides(lambda: _prepare_folder(cfg, store_manifest, info))
    out = Path(cfg.out)
    if state == "done":
        if d.is_main:
            console.print(f"{out} is already complete; nothing to do.")
        return summary(out)

    indices = store.valid_indices()
    if len(indices) == 0:
        raise ArtifactError(f"{cfg.store} has no valid entries to decode")
    # Units of work in index order, shared round-robin; a resume skips PNGs already written.
    chunks = [indices[s: s + cfg.chunk_size] for s in range(0, len(indices), cfg.chunk_size)]
    mine = [i for chunk in dist.shard(chunks, d.rank, d.world) for i in chunk if not (out / png_name(int(i))).is_file()]
    if cfg.compile:
        decoder = torch.compile(decoder)
    label = "decode" if d.world == 1 else f"decode (rank {d.rank}/{d.world})"
    t0 = time.time()
    writer = cf.ThreadPoolExecutor(max_workers=8)
    try:
        with progress(len(mine), label, unit="img") as advance, torch.inference_mode():
            for s in range(0, len(mine), cfg.batch_size):
                idx = np.asarray(mine[s: s + cfg.batch_size])
                z = torch.from_numpy(store.read(idx)).to(d.device, non_blocking=True).float()
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    images = decoder(z)
                pixels = to_uint8(images)
                list(writer.map(lambda k: write_png(out / png_name(int(idx[k])), pixels[k]), range(len(idx))))
                advance(len(idx))
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
    elapsed = time.time() - t0
    dist.barrier()
    if d.is_main:
        _finalize(cfg, out, indices, np.asarray(store.labels[:]))
    dist.barrier()
    result = summary(out)
    result["seconds"] = elapsed
    result["images_per_second"] = len(mine) / elapsed if elapsed > 0 else 0.0
    return result


def decode_training_samples(cfg: DecodeConfig, d) -> dict:
    """A run's periodic EMA samples (``RUN/samples/step_N.safetensors``, raw latents) -> one PNG grid, as
    ``train-diffusion --decoder`` would have drawn it."""
    if Path(cfg.out).suffix != ".png":
        raise RaeError(f"decoding {Path(cfg.store).name}, a file of training samples, writes one grid: --out must end "
                       f"in .png (got {cfg.out})")
    samples = load_weights(cfg.store)
    if "latents" not in samples:
        raise ArtifactError(f"{cfg.store} holds no latents: not a file of a diffusion run's samples")
    decoder, info = load_decoder_run(cfg.decoder, device=d.device, ema=cfg.ema, step=cfg.step)
    run_dir = Path(cfg.store).resolve().parent.parent
    run_manifest = read_manifest(run_dir, require_complete=False) if (run_dir / "manifest.json").is_file() else {}
    encoder = run_manifest.get("encoder") or {}
    check_compatible(encoder or info["encoder"], samples["latents"].shape[1:], info, cfg.decoder)
    if d.is_main:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            save_grid(Path(cfg.out), decode_grid(decoder, samples["latents"]), GRID_ROW)
    return {"folder": str(cfg.out), "images": len(samples["latents"]), "image_shape": [info["image_size"]] * 2 + [3],
            "npz": "-", "grid": str(cfg.out)}


def _finalize(cfg: DecodeConfig, out: Path, indices: np.ndarray, all_labels: np.ndarray) -> None:
    missing = [int(i) for i in indices if not (out / png_name(int(i))).is_file()]
    if missing:
        raise ArtifactError(f"{out}: {len(missing)} images were not written (a rank failed?); run the command again")
    labels = all_labels[indices]
    labels = labels if (labels >= 0).any() else None
    write_npz(out / NPZ, out, indices, labels)
    write_grid(out / GRID, out, indices, labels, cfg.grid_classes, cfg.grid_per_row)
    remove_temporaries(out)
    first = read_png(out / png_name(int(indices[0])))
    manifest = read_manifest(out, require_complete=False)
    manifest.update(num_images=len(indices), image_shape=list(first.shape), labelled=labels is not None,
                    files=[png_name(int(indices[0])), png_name(int(indices[-1]))],
                    content_id=digest_json({"identity": manifest["identity"], "n": len(indices)}), complete=True)
    write_manifest(out, manifest)


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="image-folder", what="image folder")
    return {"folder": str(out), "images": manifest["num_images"], "image_shape": manifest["image_shape"],
            "npz": str(Path(out) / NPZ), "grid": str(Path(out) / GRID)}
