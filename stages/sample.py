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

from . import dist
from .artifacts.atomic import jsonable
from .artifacts.manifest import (claim_output, create_artifact_dir, describe_difference, digest_json, input_ref,
                                 new_manifest, read_manifest, resume_if_same, write_manifest)
from .artifacts.outputs import stage
from .artifacts.runs import DiffusionRun
from .artifacts.store import CODECS, LatentStore, claim_blocks
from .errors import RaeError
from .generation import (SAMPLING_OPTIONS, SOLVER_OPTIONS, Sampling, check_sampling, load_models, ready,
                         sample_labels, sample_latents, sample_seeds, solver_options)
from .options import AT_LEAST_1, check_options, option
from .progress import progress


@dataclass
class SampleConfig:
    model: str = option(help="Diffusion run directory (rae train-diffusion).", short="-m", path=True)
    out: str = option(help="Output sample store (a .zarr directory).", short="-o", path=True)
    # Labels: exactly ``per_class`` samples of each class, or ``num`` random labels; ``classes`` restricts either.
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
    cfg_scale: float = SAMPLING_OPTIONS["cfg_scale"]()
    guide_model: str | None = SAMPLING_OPTIONS["guide_model"]()
    ag_scale: float = SAMPLING_OPTIONS["ag_scale"]()
    guidance_interval: tuple[float, float] = SAMPLING_OPTIONS["guidance_interval"]()
    ema: bool = SAMPLING_OPTIONS["ema"]()
    step: int | None = SAMPLING_OPTIONS["step"]()
    precision: str = SAMPLING_OPTIONS["precision"]()
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
        """What decides the store: the run settings and the options the solver does not read are left out
        (so a store made before the SDE and adaptive solvers existed keeps its identity)."""
        unread = set(SOLVER_OPTIONS) - set(solver_options(self.solver))
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY and k not in unread}


def _validate(cfg: SampleConfig) -> None:
    check_options(cfg)
    check_sampling(cfg)
    if cfg.block_size % cfg.shard_size:
        raise RaeError("the shard size must divide the block size")


#################################################################################
#                                    Stage                                      #
#################################################################################

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
    seeds = sample_seeds(cfg, n)
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


@stage
def run(cfg: SampleConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    # What the manifest records: the precision used and the interval as numbers.
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device),
                              guidance_interval=tuple(float(t) for t in cfg.guidance_interval))
    model_run, guide_run = load_models(cfg, d.device)
    sampling = Sampling.of(cfg)
    shift = cfg.shift if cfg.shift is not None else model_run.shift
    settings = sampling.settings(shift)

    out = Path(cfg.out)
    state, store, my_blocks = claim_blocks(out, lambda: _prepare_store(cfg, model_run, guide_run, settings), d)
    if state == "done":
        return summary(out)
    labels = np.asarray(store.labels[:])
    seeds = np.asarray(store.group["seeds"][:])
    model, guide = ready(model_run, guide_run, cfg.precision, cfg.compile)

    total = sum(len(store.block_range(b)) for b in my_blocks)
    label = "sample" if d.world == 1 else f"sample (rank {d.rank}/{d.world})"
    t0 = time.time()
    with progress(total, label, unit="img") as advance:
        for b in my_blocks:
            rng = store.block_range(b)
            parts, evaluations = [], []
            # Batches never cross a block: the result does not depend on how blocks are shared out.
            for s in range(rng.start, rng.stop, cfg.batch_size):
                idx = np.arange(s, min(s + cfg.batch_size, rng.stop))
                x = sample_latents(model_run, model, labels[idx], seeds[idx], sampling, shift, guide, d.device,
                                   evaluations)
                parts.append(x.cpu())
                advance(len(idx))
            lat = torch.cat(parts).numpy()
            store.write_block(b, lat, np.ones(len(rng), dtype=bool),
                              {"seconds": time.time() - t0, "model_evaluations": evaluations})
    elapsed = time.time() - t0
    dist.barrier()
    if d.is_main:
        per_batch = [n for b in range(store.num_blocks) for n in store.block_info(b).get("model_evaluations", [])]
        store.finish(model_evaluations={"batches": len(per_batch), "total": sum(per_batch),
                                        "per_batch_min": min(per_batch, default=0),
                                        "per_batch_max": max(per_batch, default=0)})
    dist.barrier()
    result = summary(out)
    result["seconds"] = elapsed
    result["images_per_second"] = total / elapsed if elapsed > 0 else 0.0
    return result


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="sample-store", what="sample store")
    return {"store": str(out), "entries": manifest["num_entries"], "latent_shape": manifest["latent_shape"],
            "sampling": manifest["sampling"], "encoder": manifest["encoder"].get("name"),
            "model_evaluations": manifest.get("model_evaluations")}
