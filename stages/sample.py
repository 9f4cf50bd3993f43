"""``rae sample``: a trained diffusion run -> a sample store of generated latents (raw encoder space).

Sample ``i`` starts from its own noise, drawn on the CPU from ``torch.Generator().manual_seed(seed + i)``,
and batches never cross a block: the store is the same whatever the batch size or the number of
``torchrun`` ranks (edm2's per-seed determinism). Work proceeds in blocks of the latent-store layout
(``stages.artifacts.store``), so a killed run resumes at the first unfinished block.

Solvers (``stages.flow``): "euler" and "heun" take ``steps`` steps from t = 1 to exactly t = 0;
"euler-ref" is the authors' sampler: their ``num_steps: 50`` (time points) is
``--solver euler-ref --steps 49`` here. Guidance: none, classifier-free guidance ("cfg", with an
interval) or AutoGuidance ("autoguidance": a smaller or earlier run as the bad model; paper:
DiT^DH-XL guided by DiT^DH-S at scale 1.42).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dist, flow
from .artifacts.atomic import jsonable
from .artifacts.manifest import (claim_output, create_artifact_dir, describe_difference, digest_json, input_ref,
                                 new_manifest, read_manifest, resume_if_same, write_manifest)
from .artifacts.outputs import stage
from .artifacts.runs import DiffusionRun, load_diffusion_run
from .artifacts.store import CODECS, LatentStore, claim_blocks
from .errors import RaeError
from .models import fp8
from .options import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check_options, option, precision_option
from .progress import progress


@dataclass
class SampleConfig:
    model: str = option(help="Diffusion run directory (rae train-diffusion).", short="-m", path=True)
    out: str = option(help="Output sample store (a .zarr directory).", short="-o", path=True)
    # Labels: exactly ``per_class`` samples of each class, or ``num`` random labels; ``classes`` restricts either.
    per_class: int | None = option(None, "Exactly K samples of every class (FID-50K: 50).", check=AT_LEAST_1)
    num: int | None = option(None, "N samples with random labels (seeded).", check=AT_LEAST_1, replaces=("per_class",))
    classes: list[int] | None = option(None, "Only these class indices (repeat the option).")
    seed: int = option(0, "Base seed: sample i starts from the noise of seed + i.")
    solver: str = option("euler", "euler | heun | euler-ref (the authors' sampler: their 50 time points = --solver "
                         "euler-ref --steps 49).")
    steps: int = option(50, "Solver steps (Heun: 2 model passes per step; 0 = no denoising: the pure-noise baseline).",
                        check=(lambda v: v >= 0, "0 (the pure-noise baseline) or more"))
    shift: float | None = option(None, "Time shift (default: the one the run was trained with).", check=POSITIVE)
    guidance: str = option("none", "none | cfg | autoguidance.", choices=("none", "cfg", "autoguidance"))
    cfg_scale: float = option(1.0, "Classifier-free guidance scale (1 = none).")
    guide_model: str | None = option(None, "AutoGuidance: the guiding (smaller/earlier) diffusion run.", path=True)
    ag_scale: float = option(1.42, "AutoGuidance scale (1.42: the paper's with DiT^DH-S).", check=NON_NEGATIVE)
    guidance_interval: tuple[float, float] = option((0.0, 1.0), "Guide only for t in [T_MIN, T_MAX] (model time, "
                                                    "t = 1 is noise).")
    ema: bool = option(True, "EMA weights or raw weights.")
    step: int | None = option(None, "Use the weights of this training step (a snapshot or a kept checkpoint) "
                              "instead of the finished run's.", check=(lambda v: v >= 0, "a step, 0 or more"))
    precision: str = precision_option(fp8=True)
    dtype: str = option("float16", "Stored latent dtype: float16 or float32.", choices=("float16", "float32"))
    codec: str = option("blosc-zstd", "Compressor: blosc-zstd | blosc-lz4 | none.", choices=CODECS, cli=False)
    shard_size: int = option(64, "Entries per Zarr shard file.", check=AT_LEAST_1, cli=False)
    block_size: int = option(1024, "Samples per unit of work and resume.", check=AT_LEAST_1)
    # Run settings: they do not change the store, so a resume may change them.
    batch_size: int = option(256, "Samples per model batch.", check=AT_LEAST_1)
    device: str = option("auto", "auto | cuda | cpu.")
    compile: bool = option(False, "torch.compile the model(s).")
    overwrite: bool = option(False, "Replace a store made with other settings.")

    RUN_ONLY = ("batch_size", "device", "compile", "overwrite", "out")

    def identity(self) -> dict:
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY}


def _validate(cfg: SampleConfig) -> None:
    check_options(cfg)
    if cfg.solver not in flow.SOLVERS:
        raise RaeError(f"--solver must be one of {', '.join(flow.SOLVERS)} (got {cfg.solver})")
    if cfg.guidance == "autoguidance" and not cfg.guide_model:
        raise RaeError("--guidance autoguidance needs --guide-model RUN (a smaller or earlier diffusion run)")
    if cfg.guide_model and cfg.guidance != "autoguidance":
        raise RaeError("--guide-model is only used with --guidance autoguidance")
    t_min, t_max = cfg.guidance_interval
    if not 0 <= t_min < t_max <= 1:
        raise RaeError(f"--guidance-interval must be t_min t_max with 0 <= t_min < t_max <= 1 (got {t_min} {t_max})")
    if (cfg.per_class is None) == (cfg.num is None):
        raise RaeError("give exactly one of --per-class K (K samples of every class) or --num N (random labels)")
    if cfg.block_size % cfg.shard_size:
        raise RaeError("the shard size must divide the block size")
    if cfg.batch_size < 1:
        raise RaeError("--batch-size must be at least 1")


#################################################################################
#                                    Labels                                     #
#################################################################################

def sample_labels(cfg: SampleConfig, num_classes: int) -> np.ndarray:
    """Labels of every sample, in store order: class-sorted for --per-class, seeded random for --num."""
    classes = np.arange(num_classes) if cfg.classes is None else np.asarray(cfg.classes, dtype=np.int64)
    if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise RaeError(f"--classes must be class indices in [0, {num_classes - 1}]")
    if cfg.per_class is not None:
        return np.repeat(classes, cfg.per_class).astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    return classes[rng.integers(0, len(classes), size=cfg.num)].astype(np.int64)


#################################################################################
#                                    Stage                                      #
#################################################################################

def guidance_scale(cfg: SampleConfig) -> float:
    """The scale of the configured guidance (1 without guidance)."""
    return {"none": 1.0, "cfg": cfg.cfg_scale, "autoguidance": cfg.ag_scale}[cfg.guidance]


def _sampling_settings(cfg: SampleConfig, shift: float) -> dict:
    return {"solver": cfg.solver, "steps": cfg.steps, "shift": shift, "guidance": cfg.guidance,
            "scale": guidance_scale(cfg),
            "interval": list(cfg.guidance_interval), "ema": cfg.ema, "precision": cfg.precision,
            "seed": cfg.seed, "noise": "torch.Generator().manual_seed(seed + index), CPU randn"}


def _prepare_store(cfg: SampleConfig, run: DiffusionRun, guide: DiffusionRun | None, settings: dict) -> str:
    """Rank 0: create, reuse or refuse the output store. Returns "done", "resume" or "new"."""
    out = Path(cfg.out)
    inputs = {"model": {**input_ref(run.path, run.manifest), "content_id": run.content_id}}
    if guide is not None:
        inputs["guide"] = input_ref(guide.path, guide.manifest)
    wanted = digest_json({"config": cfg.identity(), "inputs": [v["content_id"] for v in inputs.values()]})
    state = claim_output(out, cfg.overwrite, resume_if_same("sample-store", wanted),
                         different=lambda old: describe_difference(
                             out, cfg, old, {k: v["content_id"] for k, v in inputs.items()}),
                         foreign=f"{out} exists and is not a rae sample store; choose another --out",
                         intact=LatentStore)
    if state:
        return state
    num_classes = run.num_classes
    labels = sample_labels(cfg, num_classes)
    n = len(labels)
    seeds = cfg.seed + np.arange(n, dtype=np.int64)
    class_names = run.manifest.get("class_names") or run.config.get("class_names")
    image_size = run.config.get("image_size", run.manifest.get("image_size"))
    attrs = {"encoder": run.encoder, "image_size": image_size, "class_names": class_names,
             "num_classes": num_classes, "raw_encoder_space": True, "sampling": settings}
    manifest = new_manifest("sample-store", cfg, inputs=inputs, identity=wanted, encoder=run.encoder,
                            latent_shape=run.latent_shape, num_entries=n, class_names=class_names,
                            sampling=settings)

    def build(folder: Path) -> None:
        LatentStore.create(folder, n, tuple(run.latent_shape), cfg.dtype, labels, np.arange(n, dtype=np.int64),
                           np.zeros(n, dtype=bool), attrs, shard_size=cfg.shard_size, block_size=cfg.block_size,
                           codec=cfg.codec, extra_arrays={"seeds": seeds})
        write_manifest(folder, manifest)

    create_artifact_dir(out, build)
    return "new"


def _check_guide(run: DiffusionRun, guide: DiffusionRun) -> None:
    """The guide must live in the same latent space: same encoder, latent shape and classes."""
    for what, a, b in (("latent shape", run.latent_shape, guide.latent_shape),
                       ("encoder", {k: run.encoder.get(k) for k in ("name", "weights_sha256")},
                        {k: guide.encoder.get(k) for k in ("name", "weights_sha256")}),
                       ("number of classes", run.num_classes, guide.num_classes)):
        if a != b:
            raise RaeError(f"--guide-model {guide.path} has another {what} than --model ({b} vs {a})")


def make_velocity(cfg: SampleConfig, model, y: torch.Tensor, null_label: int, guide_model=None):
    """The solver's velocity for labels ``y`` under the configured guidance."""
    return flow.guided_velocity(model, y, method=cfg.guidance, scale=guidance_scale(cfg),
                                interval=tuple(cfg.guidance_interval),
                                guide_model=guide_model, null_label=null_label)


@stage
def run(cfg: SampleConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    # What the manifest records: the precision used and the interval as numbers.
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device),
                              guidance_interval=tuple(float(t) for t in cfg.guidance_interval))
    if cfg.precision == "fp8" and (why := fp8.float8_supported(d.device)):
        raise RaeError(why)
    model_run = load_diffusion_run(cfg.model, ema=cfg.ema, device=d.device, step=cfg.step)
    guide_run = load_diffusion_run(cfg.guide_model, ema=cfg.ema, device=d.device) if cfg.guidance == "autoguidance" else None
    if guide_run is not None:
        _check_guide(model_run, guide_run)
    shift = cfg.shift if cfg.shift is not None else model_run.shift
    settings = _sampling_settings(cfg, shift)

    out = Path(cfg.out)
    state, store, my_blocks = claim_blocks(out, lambda: _prepare_store(cfg, model_run, guide_run, settings), d)
    if state == "done":
        return summary(out)
    labels = np.asarray(store.labels[:])
    seeds = np.asarray(store.group["seeds"][:])
    model, guide = model_run.model, guide_run.model if guide_run else None
    if cfg.precision == "fp8":
        model, guide = (fp8.to_float8(m, m.per_token_linears()) if m is not None else None for m in (model, guide))
    if cfg.compile:
        model = torch.compile(model)
        guide = torch.compile(guide) if guide is not None else None
    null_label = model_run.null_label

    total = sum(len(store.block_range(b)) for b in my_blocks)
    label = "sample" if d.world == 1 else f"sample (rank {d.rank}/{d.world})"
    t0 = time.time()
    with progress(total, label, unit="img") as advance:
        for b in my_blocks:
            rng = store.block_range(b)
            parts = []
            # Batches never cross a block: the result does not depend on how blocks are shared out.
            for s in range(rng.start, rng.stop, cfg.batch_size):
                idx = np.arange(s, min(s + cfg.batch_size, rng.stop))
                x = sample_latents(model_run, model, labels[idx], seeds[idx], cfg, shift, null_label, guide, d.device)
                parts.append(x.cpu())
                advance(len(idx))
            lat = torch.cat(parts).numpy()
            store.write_block(b, lat, np.ones(len(rng), dtype=bool), {"seconds": time.time() - t0})
    elapsed = time.time() - t0
    dist.barrier()
    if d.is_main:
        store.finish()
    dist.barrier()
    result = summary(out)
    result["seconds"] = elapsed
    result["images_per_second"] = total / elapsed if elapsed > 0 else 0.0
    return result


@torch.inference_mode()
def sample_latents(model_run: DiffusionRun, model, labels, seeds, cfg: SampleConfig, shift: float,
                   null_label: int, guide=None, device="cpu") -> torch.Tensor:
    """One batch: noise from the seeds -> ODE solve (state in float32) -> raw encoder space [B, C, h, w]."""
    noise = flow.seeded_noise(seeds, model_run.latent_shape).to(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=noise.device)
    velocity = make_velocity(cfg, model, y, null_label, guide)
    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=cfg.precision in ("bf16", "fp8")):
        x = flow.sample(velocity, noise, cfg.steps, shift, cfg.solver)
    return model_run.to_raw(x.float())


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="sample-store", what="sample store")
    return {"store": str(out), "entries": manifest["num_entries"], "latent_shape": manifest["latent_shape"],
            "sampling": manifest["sampling"], "encoder": manifest["encoder"].get("name")}
