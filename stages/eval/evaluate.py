"""``rae eval``: FID, sFID, Inception Score, precision/recall, KID, FD_DINOv2 and PSNR/SSIM, in PyTorch,
giving the numbers of the ADM evaluation suite (openai/guided-diffusion ``evaluations/evaluator.py``).

IMAGES is a folder of images or an ADM ``.npz`` (``stages.eval.inputs``). REF is an ADM reference
batch, images, or a statistics file written earlier with ``--save-ref`` (``stages.eval.refs``). rFID is
REF = images: ``rae eval RECONSTRUCTIONS --ref ORIGINALS --pairs`` (the paper's protocol: the 50,000
ImageNet validation images, ADM center crop at 256, reconstructed by the autoencoder) also gives PSNR
and SSIM over matched pairs (sorted file names, or ``.npz`` order).

The features are ``stages.eval.nets``'s (Inception, DINOv2), one pass over each image set collects
them (``stages.eval.features``) and the maths is ``stages.eval.metrics``'s; this module decides what can be
scored, runs the passes and writes eval.json. TF32 is switched off while evaluating: it would move
Inception features.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from .. import __version__
from ..artifacts.atomic import atomic_write_json, jsonable
from ..artifacts.manifest import has_manifest
from ..artifacts.outputs import stage
from ..errors import ArtifactError, RaeError
from ..models.lpips import LPIPS
from ..models.weights import MissingWeightsError
from ..generation import SAMPLING_OPTIONS, check_sampling
from ..options import AT_LEAST_1, check_options, flag, option
from ..progress import console
from . import metrics as M
from .features import Collector, PairSums, feature_pass
from .generated import Generator
from .inputs import ImageSet, artifact_content_id
from .nets import (DINOV2_DEFAULT, SPATIAL_CHANNELS, SPATIAL_DIM, SPATIAL_GRID, SPATIAL_LAYER, exact_float32,
                   load_dinov2, load_inception, load_store_encoder)
from .refs import Reference, RefStats, check_stats_identity, open_reference, save_ref_stats

METRICS = ("fid", "sfid", "is", "pr", "kid", "fd_dinov2", "lpips")  # all of them: the default (lpips: with --pairs)
INCEPTION_METRICS = ("fid", "sfid", "is", "pr", "kid")


@dataclass
class EvalConfig:
    images: str | None = option(None, "Images to evaluate: a folder of PNGs or an ADM .npz (arr_0: uint8 N x H x W "
                                "x 3). Or none, with --model: samples made, decoded and scored in memory.",
                                path=True, argument=True)
    ref: str | None = option(None, "Reference: an ADM reference batch .npz (its mu/sigma and mu_s/sigma_s are the FID "
                             "and sFID reference, its images the precision/recall one), an image folder or .npz, or a "
                             "statistics file written by --save-ref.", path=True)
    pairs: bool = option(False, "Also PSNR and SSIM over matched pairs (IMAGES[i] vs REF[i]: sorted file names or .npz "
                         "order). With reconstructions vs originals, FID is rFID.")
    save_ref: str | None = option(None, "Write IMAGES' statistics (Inception mu/sigma, spatial mu_s/sigma_s and pool "
                                  "features, DINOv2 mu/sigma) to this .npz or .safetensors, for later --ref.", path=True)
    out: str | None = option(None, "Where to write eval.json (default: inside a `rae decode` folder; NAME.eval.json "
                             "beside an .npz in a rae artifact folder, else in the current folder).", path=True)
    metrics: tuple[str, ...] = option(METRICS, "Comma-separated: fid, sfid (ADM's spatial FID: Inception mixed_6/conv, "
                                      "first 7 channels), is, pr (precision/recall), kid, fd_dinov2, lpips (with --pairs).")
    inception_weights: str | None = option(None, "torch-fidelity's Inception file (weights-inception-2015-12-05-"
                                           "6726825d.pth); default: the torch hub cache.", path=True)
    dinov2_weights: str | None = option(None, "DINOv2 weights file for FD_DINOv2; default: the timm / Hugging Face "
                                        "cache.", path=True)
    fd_model: str = option(DINOV2_DEFAULT, "timm DINOv2 model for the FD in representation space (the default is "
                           "EDM2's FD_DINOv2; e.g. vit_base_patch14_reg4_dinov2.lvd142m for the RAE encoder's own "
                           "network).")
    fd_encoder: str | None = option(None, "A latent store: compute the FD in its RAE encoder's space (mean-pooled "
                                    "latent tokens) instead of DINOv2-L; needs no downloaded weights when the store's "
                                    "encoder is local.", path=True)
    lpips_vgg_weights: str | None = option(None, "--pairs' LPIPS: torchvision's VGG16 file (vgg16-397923af.pth); "
                                           "default: the torch hub cache.", path=True)
    lpips_lin_weights: str | None = option(None, "--pairs' LPIPS: the v0.1 linear layers (default: the copy in the "
                                           "lpips package).", path=True)
    offline: bool = option(False, "Never download weights (use caches and files only).")
    # Metrics straight from a model: `rae sample`'s options, then decoded with --decoder, all in memory.
    model: str | None = option(None, "Score samples of this diffusion run instead of IMAGES (with --decoder and "
                               "`rae sample`'s options; no store or PNG is written).", short="-m", path=True)
    decoder: str | None = option(None, "--model: the decoder run that turns the samples into images.", short="-d",
                                 path=True)
    per_class: int | None = SAMPLING_OPTIONS["per_class"]()
    num: int | None = SAMPLING_OPTIONS["num"]()
    classes: list[int] | None = SAMPLING_OPTIONS["classes"]()
    seed: int = SAMPLING_OPTIONS["seed"]()
    solver: str = SAMPLING_OPTIONS["solver"]()
    steps: int = SAMPLING_OPTIONS["steps"]()
    diffusion_form: str = SAMPLING_OPTIONS["diffusion_form"]()
    diffusion_norm: float = SAMPLING_OPTIONS["diffusion_norm"]()
    last_step: str = SAMPLING_OPTIONS["last_step"]()
    last_step_size: float = SAMPLING_OPTIONS["last_step_size"]()
    atol: float = SAMPLING_OPTIONS["atol"]()
    rtol: float = SAMPLING_OPTIONS["rtol"]()
    shift: float | None = SAMPLING_OPTIONS["shift"]()
    guidance: str = SAMPLING_OPTIONS["guidance"]()
    cfg_scale: tuple[float, ...] = SAMPLING_OPTIONS["cfg_scale"](many=True)
    guide_model: str | None = SAMPLING_OPTIONS["guide_model"]()
    ag_scale: tuple[float, ...] = SAMPLING_OPTIONS["ag_scale"](many=True)
    guidance_interval: tuple[float, float] = SAMPLING_OPTIONS["guidance_interval"]()
    ema: bool = SAMPLING_OPTIONS["ema"]()
    step: int | None = SAMPLING_OPTIONS["step"]()
    precision: str = SAMPLING_OPTIONS["precision"]()
    latent_dtype: str = option("float16", "--model: the samples are rounded to this dtype before decoding, as a "
                               "sample store keeps them (`rae sample --dtype`), so the scores equal the files' ones.",
                               choices=("float16", "float32"))
    sample_batch_size: int = option(256, "--model: samples per model batch (per GPU).", check=AT_LEAST_1)
    compile: bool = option(False, "--model: torch.compile the diffusion model(s) and the decoder.")
    # Protocol constants (ADM / torch-fidelity defaults).
    is_split_size: int = 5000
    pr_k: int = 3
    pr_batch_size: int = 10000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_seed: int = 0
    # Run settings.
    batch_size: int = option(64, "Images per forward pass of the feature networks (per GPU).", check=AT_LEAST_1)
    num_workers: int = option(4, "Image-decoding processes per GPU.")
    device: str = option("auto", "auto, cuda or cpu.")


# ----------------------------------------------------------------------------------------------
# run


def default_out(images: str | os.PathLike, generated: bool = False) -> Path:
    """Where eval.json goes without --out: never into a user's dataset nor into a run. Inside a rae image
    folder (its documented place, which `rae decode` clears on resume), ``NAME.eval.json`` beside an .npz
    of a rae artifact folder, else (and for ``--model RUN``, ``generated``) ``NAME.eval.json`` in the
    current folder."""
    p = Path(images)
    if generated:
        return Path.cwd() / f"{p.resolve().name}.eval.json"
    if p.is_dir():
        return p / "eval.json" if has_manifest(p) else Path.cwd() / f"{p.resolve().name or 'images'}.eval.json"
    return p.with_name(p.stem + ".eval.json") if has_manifest(p.parent) else Path.cwd() / f"{p.stem}.eval.json"


def fd_key(fd_model: str) -> str:
    return "fd_dinov2" if fd_model == DINOV2_DEFAULT else f"fd_{fd_model}"


def _validate(cfg: EvalConfig) -> None:
    check_options(cfg)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise RaeError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if (cfg.images is None) == (cfg.model is None):
        raise RaeError("give the images to evaluate (a folder or an .npz), or --model RUN --decoder DEC to score "
                       "a diffusion run's samples" if cfg.images is None else
                       "give either IMAGES or --model, not both")
    if cfg.model is not None:
        if not cfg.decoder:
            raise RaeError("--model needs --decoder DEC_RUN, the decoder that turns its samples into images")
        if cfg.pairs or cfg.save_ref:
            raise RaeError(f"{'--pairs' if cfg.pairs else '--save-ref'} is for image files, not --model samples")
        check_sampling(cfg)
        unused = {"none": ("cfg_scale", "ag_scale"), "cfg": ("ag_scale",), "autoguidance": ("cfg_scale",)}
        for name in unused[cfg.guidance]:
            if len(getattr(cfg, name)) > 1:
                raise RaeError(f"{flag(name)} lists several scales, but --guidance is {cfg.guidance}")
    if cfg.save_ref and Path(cfg.save_ref).suffix not in (".npz", ".safetensors"):
        raise RaeError(f"--save-ref must end in .npz or .safetensors (got {Path(cfg.save_ref).name})")
    if cfg.pairs and not cfg.ref:
        raise RaeError("--pairs needs --ref (the originals the images are matched with)")
    elif cfg.decoder and not cfg.model:
        raise RaeError("--decoder is used with --model (to score a diffusion run's samples)")


def _rank0_first(d, load):
    """Rank 0 loads (and downloads into the cache) first; the others then find the file cached."""
    if not d.is_main:
        dist.barrier()
    try:
        return load()
    finally:
        if d.is_main:
            dist.barrier()


def _warn(d, msg: str) -> None:
    if d.is_main:
        console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def _own_folder(cfg: EvalConfig) -> tuple[str, ...]:
    """eval.json may go inside IMAGES when it is a ``rae decode`` folder (its documented place)."""
    return ("IMAGES",) if cfg.images and Path(cfg.images).is_dir() and has_manifest(cfg.images) else ()


@stage(allow_inside=_own_folder)
def run(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.images``; returns (on every rank) the dict written to eval.json."""
    _validate(cfg)
    d = dist.init(cfg.device)
    if cfg.model:  # what eval.json records: the precision the samples were made in
        cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device))
    with exact_float32():
        return _run(cfg, d)


def _sets(cfg: EvalConfig, d) -> tuple[list, str | None]:
    """What is scored: IMAGES, or one generated set per guidance scale of --model (and the option swept)."""
    if not cfg.model:
        return [ImageSet(cfg.images)], None
    gen = Generator(cfg, d)
    field = {"cfg": "cfg_scale", "autoguidance": "ag_scale"}.get(cfg.guidance)
    scales = getattr(cfg, field) if field else (None,)
    if len(scales) > 1 and d.is_main:
        console.print(f"scoring {len(scales)} scales of {flag(field)}: {', '.join(f'{v:g}' for v in scales)}",
                      highlight=False)
    return [gen.images(scale) for scale in scales], (flag(field) if len(scales) > 1 else None)


def _run(cfg: EvalConfig, d) -> dict:
    sets, swept = _sets(cfg, d)
    images = sets[0]
    ref = open_reference(cfg.ref) if cfg.ref else None
    wanted = [m for m in METRICS if m in cfg.metrics]
    fdk = "fd_rae" if cfg.fd_encoder else fd_key(cfg.fd_model)

    if cfg.pairs:
        if ref.images is None:
            raise RaeError(f"--pairs needs the reference to be images (a folder or an .npz with arr_0), "
                           f"not the {ref.kind} file {ref.path}")
        if len(ref.images) != len(images):
            raise RaeError(f"--pairs: {len(images)} images but {len(ref.images)} reference images")
        # A rae image folder's files are entry-numbered: paired by entry order by construction.
        if (images.files and ref.images.files and images.files != ref.images.files
                and not has_manifest(images.path) and not has_manifest(ref.images.path)):
            _warn(d, "--pairs: file names differ between the two folders; pairing by sorted order")
    notes = []
    if ref is not None and not cfg.model and _same_images(images, ref.images):
        notes.append("IMAGES and --ref are the same images: " + (
            "the scores against its images are trivial (FID and sFID use its precomputed statistics)"
            if ref.kind == "adm-ref-batch" else "FID and the other distances are 0 by construction"))

    pre = ref.stats if ref is not None and ref.stats is not None else RefStats()
    fd_name = {"fd_dinov2": fdk}
    skipped = _reference_skips(ref, pre, wanted, fd_name)

    def want(m):
        return m in wanted and fd_name.get(m, m) not in skipped

    # Extractors. Missing weights skip their metrics (one warning line); a bad or absent named file is an error.
    need_inception = any(want(m) for m in INCEPTION_METRICS) or bool(cfg.save_ref)
    need_dinov2 = want("fd_dinov2") or (bool(cfg.save_ref) and "fd_dinov2" in wanted)
    inception = dinov2 = None
    missing: list[MissingWeightsError] = []
    if need_inception:
        try:
            inception = _rank0_first(d, lambda: load_inception(cfg.inception_weights, cfg.offline, d.device))
        except MissingWeightsError as e:
            if cfg.inception_weights:
                raise
            missing.append(e)
            lost = [m for m in INCEPTION_METRICS if want(m)]
            for m in lost:
                skipped[m] = str(e)
            _warn(d, f"{e}; skipping {', '.join(lost) if lost else 'the Inception statistics of --save-ref'}")
        if inception is not None and not inception.identity["official"]:
            _warn(d, f"{inception.identity['weights']} is not torch-fidelity's published Inception file: "
                     "the numbers are not comparable with published ones")
    if need_dinov2:
        try:
            dinov2 = _rank0_first(d, lambda: load_store_encoder(cfg.fd_encoder, d.device) if cfg.fd_encoder
                                  else load_dinov2(cfg.fd_model, cfg.dinov2_weights, cfg.offline, d.device))
        except MissingWeightsError as e:
            if cfg.dinov2_weights:
                raise
            missing.append(e)
            if want("fd_dinov2"):
                skipped[fdk] = str(e)
            _warn(d, f"{e}; skipping {fdk}")
    if ref is not None and ref.kind == "stats":
        check_stats_identity(ref, inception, dinov2)
    if ref is not None and ref.kind == "adm-ref-batch" and inception is not None and not inception.identity["official"]:
        given = [name for m, name, present in (("fid", "FID", pre.mu), ("sfid", "sFID", pre.mu_s))
                 if want(m) and present is not None]
        if given:
            _warn(d, f"{' and '.join(given)} against an ADM reference batch's precomputed statistics "
                     "is only meaningful with the official Inception weights")

    fd_ok = dinov2 is not None and want("fd_dinov2")
    want_pool = want("pr") or want("kid")

    def collector(n: int) -> Collector:
        return Collector(n, d.device, inception, dinov2 if fd_ok or cfg.save_ref else None,
                         fid_stats=want("fid") or bool(cfg.save_ref), keep_pool=want_pool or bool(cfg.save_ref),
                         with_is=want("is"), is_split_size=cfg.is_split_size,
                         spatial_stats=want("sfid") or bool(cfg.save_ref))

    img_col = collector(len(images))
    ref_col = None
    if ref is not None and ref.images is not None:
        ref_col = Collector(len(ref.images), d.device, inception, dinov2 if fd_ok and pre.dinov2_mu is None else None,
                            fid_stats=want("fid") and pre.mu is None, keep_pool=want_pool and pre.pool is None,
                            spatial_stats=want("sfid") and pre.mu_s is None)
    if not img_col.busy and not cfg.pairs:
        if missing:
            raise missing[0]
        raise RaeError("nothing to evaluate: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    # Passes. With --pairs the two aligned sets go through together (each image is read once); otherwise
    # the images, then the reference (once, for every set of a sweep).
    pair_sums = PairSums(d.device, _pair_lpips(cfg, d, skipped) if "lpips" in wanted else None) if cfg.pairs else None
    if cfg.pairs:
        feature_pass([images, ref.images], [img_col, ref_col], d, cfg.batch_size, cfg.num_workers, "eval (pairs)",
                     pair_sums)
    pair_values = pair_sums.finish() if pair_sums is not None else {}
    results = []
    for k, one in enumerate(sets):
        col = img_col if k == 0 else collector(len(one))
        if cfg.model:
            one.feed(col, cfg.batch_size, "eval samples" + (f" ({swept} {one.sampling.scale:g})" if swept else ""))
        elif not cfg.pairs:
            feature_pass([one], [col], d, cfg.batch_size, cfg.num_workers, "eval images")
        col.finish()
        if k == 0 and ref_col is not None:
            if not cfg.pairs and ref_col.busy:
                feature_pass([ref.images], [ref_col], d, cfg.batch_size, cfg.num_workers, "eval reference")
            ref_col.finish()
        result = None
        if d.is_main:
            result = _report(cfg, d, _Passes(one, ref, pre, col, ref_col, pair_values, inception, dinov2, wanted,
                                             dict(skipped), fdk, notes))
        results.append(result)
    result = _write(cfg, results, swept) if d.is_main else None
    return dist.broadcast_object(result)


def _pair_lpips(cfg: EvalConfig, d, skipped: dict[str, str]):
    """--pairs' LPIPS (VGG, v0.1) on the device, or None with the reason in ``skipped`` when its VGG16
    weights are not at hand (named files that are missing or wrong are an error)."""
    try:
        return _rank0_first(d, lambda: LPIPS(cfg.lpips_vgg_weights, cfg.lpips_lin_weights,
                                             offline=cfg.offline).to(d.device))
    except MissingWeightsError as e:
        if cfg.lpips_vgg_weights or cfg.lpips_lin_weights:
            raise
        skipped["lpips"] = str(e)
        _warn(d, f"{e}; skipping LPIPS")
        return None


def _arr0_crc(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return z.getinfo("arr_0.npy").CRC


def _same_images(images: ImageSet, other: ImageSet | None) -> bool:
    """Whether the reference's images are IMAGES themselves (the same file or folder, or a copy): the
    scores are then trivial, which the result says."""
    if other is None:
        return False
    if os.path.samefile(images.path, other.path):
        return True
    if other.kind != images.kind or len(other) != len(images) or other.listing_sha256() != images.listing_sha256():
        return False
    # Listings are names and sizes (two decodes' samples.npz of one shape share theirs): the contents too,
    # cheaply: the zip's CRC-32 of arr_0, or the bytes of the first, middle and last files.
    if images.kind == "npz":
        return _arr0_crc(images.path) == _arr0_crc(other.path)
    return all((images.path / images.files[i]).read_bytes() == (other.path / other.files[i]).read_bytes()
               for i in {0, len(images) // 2, len(images) - 1})


def _reference_skips(ref: Reference | None, pre: RefStats, wanted: list[str],
                     fd_name: dict[str, str]) -> dict[str, str]:
    """What the reference cannot give: those metrics are skipped before any network is loaded."""
    skipped: dict[str, str] = {}
    if ref is None:
        for m in ("fid", "sfid", "pr", "kid", "fd_dinov2"):
            if m in wanted:
                skipped[fd_name.get(m, m)] = "needs a reference (--ref)"
    elif ref.kind == "stats":
        for m, present, what in (("fid", pre.mu, "Inception mu/sigma"),
                                 ("sfid", pre.mu_s, "Inception spatial statistics (mu_s/sigma_s)"),
                                 ("pr", pre.pool, "Inception pool features"),
                                 ("kid", pre.pool, "Inception pool features"),
                                 ("fd_dinov2", pre.dinov2_mu, "DINOv2 statistics")):
            if m in wanted and present is None:
                skipped[fd_name.get(m, m)] = f"{ref.path} holds no {what}"
    # Checked before any feature pass: FID needs Inception's 2048-dim pool statistics.
    if "fid" in wanted and pre.mu is not None and (np.shape(pre.mu) != (2048,) or np.shape(pre.sigma) != (2048, 2048)):
        raise ArtifactError(f"{ref.path}: mu/sigma are {np.shape(pre.mu)}/{np.shape(pre.sigma)}, not Inception's "
                            "2048-dim pool statistics (ADM's reference batches and `rae eval --save-ref` files are)")
    return skipped


@dataclass
class _Passes:
    """What ``_run`` gathered for the report: the two sets, the reference's precomputed statistics,
    the collectors of the feature passes, the PSNR/SSIM values, the networks, and what was asked,
    skipped and noted."""
    images: ImageSet
    ref: Reference | None
    pre: RefStats
    img_col: Collector
    ref_col: Collector | None
    pair_values: dict
    inception: Any
    dinov2: Any
    wanted: list[str]
    skipped: dict[str, str]
    fdk: str
    notes: list[str]


def _report(cfg: EvalConfig, d, p: _Passes) -> dict:
    images, ref, pre, img_col, ref_col = p.images, p.ref, p.pre, p.img_col, p.ref_col
    inception, dinov2, wanted, skipped, fdk = p.inception, p.dinov2, p.wanted, p.skipped, p.fdk
    values: dict[str, float] = {}

    def want(m):
        return m in wanted and m not in skipped

    computed_ref = _collected_stats(ref_col, ref.path) if ref_col is not None else None

    def ref_value(name):
        got = getattr(pre, name)
        return got if got is not None else (getattr(computed_ref, name) if computed_ref is not None else None)

    if want("fid"):
        mu, sigma = _mean_cov(img_col.inc_stats, images.path)
        values["fid"] = M.frechet_distance(mu, sigma, ref_value("mu"), ref_value("sigma"))
    if want("sfid"):  # ADM's sFID: the same Frechet distance on the mixed_6/conv spatial statistics
        mu_s, sigma_s = _mean_cov(img_col.sp_stats, images.path)
        values["sfid"] = M.frechet_distance(mu_s, sigma_s, ref_value("mu_s"), ref_value("sigma_s"))
    if want("is"):
        values["is"], values["is_std"] = img_col.is_parts.compute()
    kid_subset = cfg.kid_subset_size
    if want("pr") or want("kid"):
        ref_pool = torch.from_numpy(np.asarray(ref_value("pool"), dtype=np.float32)).to(d.device)
        sam_pool = torch.from_numpy(img_col.pool).to(d.device)
        if want("pr"):
            try:
                values["precision"], values["recall"] = M.precision_recall(
                    ref_pool, sam_pool, k=cfg.pr_k, batch_size=cfg.pr_batch_size)
            except ValueError as e:  # too few images for k-NN balls
                skipped["pr"] = str(e)
        if want("kid"):
            try:
                values["kid"], values["kid_std"] = M.kernel_inception_distance(
                    sam_pool, ref_pool, cfg.kid_subsets, cfg.kid_subset_size, cfg.kid_seed)
                kid_subset = min(cfg.kid_subset_size, len(sam_pool), len(ref_pool))  # as the metric draws them
            except ValueError as e:
                skipped["kid"] = str(e)
    if dinov2 is not None and fdk not in skipped and ref is not None:
        mu, sigma = _mean_cov(img_col.dino_stats, images.path)
        values[fdk] = M.frechet_distance(mu, sigma, ref_value("dinov2_mu"), ref_value("dinov2_sigma"))
    values.update(p.pair_values)

    extractors = {}
    if inception is not None:
        extractors["inception"] = inception.identity
    if dinov2 is not None:
        extractors["dinov2"] = dinov2.identity
    result = {
        "kind": "eval",
        "rae_version": __version__,
        "metrics": values,
        "skipped": skipped,
        "notes": p.notes,
        "num_images": len(images),
        "num_ref_images": len(ref.images) if ref is not None and ref.images is not None else None,
        # What was scored: its listing (file names and sizes) and, for a `rae decode` folder, its content id.
        "images": images.identity() if cfg.model else {
            "path": str(images.path.resolve()), "kind": images.kind, "listing_sha256": images.listing_sha256(),
            "content_id": artifact_content_id(images.path)},
        "reference": ref.identity(computed_ref) if ref is not None else None,
        "fid_reference": (None if "fid" not in values else "precomputed mu/sigma of the reference"
                          if pre.mu is not None else "computed from the reference images"),
        "sfid_reference": (None if "sfid" not in values else "precomputed mu_s/sigma_s of the reference"
                           if pre.mu_s is not None else "computed from the reference images"),
        "extractors": extractors,
        "protocol": {
            "is_split_size": cfg.is_split_size, "pr_k": cfg.pr_k,
            "pr_distances": "squared L2, float16 (float32 on overflow), as ADM",
            "sfid_features": f"Inception mixed_6/conv ({SPATIAL_LAYER}, after batch norm and ReLU), channels "
                             f"0-{SPATIAL_CHANNELS - 1} of the {SPATIAL_GRID}x{SPATIAL_GRID} map, flattened NHWC: "
                             f"{SPATIAL_DIM} dims, as ADM",
            "kid": f"polynomial kernel (x.y/d+1)^3, {cfg.kid_subsets} subsets of {kid_subset}, seed {cfg.kid_seed}",
            "psnr_ssim": "per image on [0,255] (data range 255), then averaged; "
                         "SSIM Gaussian window 11, sigma 1.5, per channel",
            "world_size": d.world,
        },
        "config": jsonable(cfg),
    }
    if cfg.save_ref:
        _save_ref(cfg, images, img_col, inception, dinov2, skipped)
        result["saved_ref"] = str(cfg.save_ref)
    return result


def _write(cfg: EvalConfig, results: list[dict], swept: str | None) -> dict:
    """eval.json: the one result, or a sweep's (``swept``: the option whose comma list was scored) with
    every scale's result in order."""
    result = results[0] if swept is None else {
        "kind": "eval-sweep", "rae_version": __version__, "swept": swept,
        "scales": [r["images"]["sampling"]["scale"] for r in results], "results": results,
        "images": {k: v for k, v in results[0]["images"].items() if k != "sampling"}, "config": jsonable(cfg)}
    out = Path(os.path.abspath(cfg.out if cfg.out else default_out(cfg.images or cfg.model, generated=bool(cfg.model))))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {k: v for k, v in result.items() if k != "saved_ref"})
    return {**result, "written": str(out)}  # printed: where it really is


def _save_ref(cfg: EvalConfig, images: ImageSet, img_col: Collector, inception, dinov2,
              skipped: dict[str, str]) -> None:
    """Write IMAGES' statistics for later runs to compare against (``--save-ref``)."""
    stats = RefStats(pool=img_col.pool, meta={"source": str(images.path.resolve()), "num_images": len(images),
                                              **({"inception": inception.identity} if inception else {}),
                                              **({"dinov2": dinov2.identity} if dinov2 else {})})
    own = open_reference(images.path) if images.kind == "npz" else None
    own = own.stats if own is not None and own.kind == "adm-ref-batch" else RefStats()
    # Saving an ADM reference batch keeps its precomputed FID and sFID statistics (FID's are of the
    # whole training set), not those of the 10,000 images it carries.
    if own.mu is not None:
        stats.mu, stats.sigma = own.mu, own.sigma
        stats.meta["fid_statistics"] = "precomputed mu/sigma of the ADM reference batch"
    elif img_col.inc_stats is not None:
        stats.mu, stats.sigma = _mean_cov(img_col.inc_stats, images.path)
    if own.mu_s is not None:
        stats.mu_s, stats.sigma_s = own.mu_s, own.sigma_s
        stats.meta["sfid_statistics"] = "precomputed mu_s/sigma_s of the ADM reference batch"
    elif img_col.sp_stats is not None:
        stats.mu_s, stats.sigma_s = _mean_cov(img_col.sp_stats, images.path)
    if img_col.dino_stats is not None:
        stats.dinov2_mu, stats.dinov2_sigma = _mean_cov(img_col.dino_stats, images.path)
    if not stats.arrays():
        raise RaeError(f"--save-ref: no statistics could be computed ({'; '.join(skipped.values())})")
    Path(cfg.save_ref).parent.mkdir(parents=True, exist_ok=True)
    save_ref_stats(cfg.save_ref, stats)


def _mean_cov(stats: M.FeatureStats, where) -> tuple[np.ndarray, np.ndarray]:
    if stats.n < 2:
        raise ArtifactError(f"{where}: need at least 2 images for feature statistics, have {stats.n}")
    return stats.mean_cov()


def _collected_stats(col: Collector, where) -> RefStats:
    """The reference statistics a pass computed from the reference's images."""
    stats = RefStats(pool=col.pool)
    if col.inc_stats is not None:
        stats.mu, stats.sigma = _mean_cov(col.inc_stats, where)
    if col.sp_stats is not None:
        stats.mu_s, stats.sigma_s = _mean_cov(col.sp_stats, where)
    if col.dino_stats is not None:
        stats.dinov2_mu, stats.dinov2_sigma = _mean_cov(col.dino_stats, where)
    return stats
