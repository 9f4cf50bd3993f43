"""``rae train-decoder``: train the RAE pixel decoder on a latent store (the encoder never runs).

The loss and one training step (L1 + LPIPS + adaptive GAN on noise-augmented latents, in the
reference's order of operations) are ``stages.train.decoder_step``'s; this module runs them: the
store's batches (``stages.train.data.BatchPlan``), the run directory (a decoder run, ``stages.artifacts.runs``),
checkpoints, the log (``stages.train.runlog``), previews and resume.

Everything a step draws is a function of (seed, step) and of the position in the global batch, so
a resumed run continues exactly where the interrupted one stopped, and the batches, the latent
noise and lambda do not depend on the number of GPUs. ``--grad-accum A`` splits each process's
share of the batch into A micro-batches whose gradients are summed before the step: one process
with A = 2 computes, micro-batch by micro-batch, what two processes compute (bit for bit:
tests/test_pipeline_chain.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..artifacts.atomic import remove_temporaries
from ..artifacts.checkpoint import resume_state, save_checkpoint, save_weights
from ..artifacts.manifest import (RECORDS, claim_output, describe_difference, digest_json, file_records, input_ref,
                                  new_manifest, read_manifest, resume_if_same, write_manifest)
from ..artifacts.outputs import stage
from ..artifacts.runs import (DECODER_EMA, check_compatible, DECODER_FILES, DECODER_RAW, STATS, decoder_config, load_decoder_run,
                              save_snapshot, start_from, write_config)
from ..artifacts.store import open_complete_store
from ..errors import ArtifactError, RaeError
from ..eval.live import ReconScorer
from ..models.decoder import DECODER_SIZES, ViTDecoder, pixels
from ..models.encoders import UNKNOWN_DIGEST, build_encoder
from ..options import check_options
from ..progress import console, progress
from .config import TrainDecoderConfig, decoder_size, micro_batches
from .data import BatchPlan, StoreReader, batches, check_source_images
from .decoder_step import DecoderTraining, Schedule, build_loss_networks
from .runlog import append_metrics, plot_metrics, truncate_metrics
from .tracking import DataWait, Deadline, closing, machine_record, open_tracker, require_wandb


def _validate(cfg: TrainDecoderConfig) -> None:
    check_options(cfg)
    require_wandb(cfg.wandb)
    if cfg.eval_every and not cfg.eval_data:
        raise RaeError("--eval-every reconstructs held-out images: it needs --eval-data VAL_STORE")
    if cfg.model not in DECODER_SIZES:
        raise RaeError(f"unknown decoder --model '{cfg.model}'; choose one of: {', '.join(DECODER_SIZES)}")
    if cfg.random_loss_nets and (cfg.disc_weights or cfg.lpips_vgg_weights or cfg.lpips_lin_weights):
        raise RaeError("--random-loss-nets and weight files for LPIPS or the discriminator exclude each other")
    size = decoder_size(cfg)
    if size["width"] % size["heads"] or size["width"] % 4:
        raise RaeError(f"decoder width {size['width']} must be divisible by 4 and by its {size['heads']} heads")


# ---------------------------------------------------------------------------------------------
# The decoder's size


def decoder_architecture(cfg: TrainDecoderConfig, encoder: dict, latent_shape) -> dict:
    """``ViTDecoder`` keyword arguments for the store's latents: what config.json records and
    ``rae decode`` rebuilds. The decoder undoes the encoder's own input normalisation."""
    c, h, w = (int(s) for s in latent_shape)
    if h != w:
        raise ArtifactError(f"the decoder needs a square token grid, the store's latents are [{c}, {h}, {w}]")
    return dict(in_dim=c, grid=h, patch_size=cfg.decoder_patch, **decoder_size(cfg),
                image_mean=[float(v) for v in encoder["mean"]], image_std=[float(v) for v in encoder["std"]])


# ---------------------------------------------------------------------------------------------
# The run directory


class _Reader(StoreReader):
    """Store batches with source images cropped at the decoder's output size. Usually the store's
    own size; an upsampling decoder (p_d = 2 p_e) learns 512 px images from the latents of 256 px ones."""

    def __init__(self, path: str, image_size: int, crop_seed: int | None = None):
        super().__init__(path, with_images=True, crop_seed=crop_seed)
        self.image_size = image_size

    def _open(self):
        store = super()._open()
        self._size = self.image_size
        return store


def frozen_encoder(cfg: TrainDecoderConfig, store_manifest: dict, latent_dtype, device: torch.device):
    """--augment reference: the store's own encoder, rebuilt from what `rae encode` recorded (name,
    image size, weights file or seeded random weights) and checked by the sha256 of its weights.
    Returns ``encode(uint8 images on the device)``: float32 latents exactly as the store would hold
    them (the encoder's output rounded to the store's dtype), so a center crop gives the stored latent."""
    made = store_manifest.get("config") or {}
    recorded = store_manifest["encoder"]
    weights = cfg.encoder_weights or made.get("encoder_weights")
    encoder, digest = build_encoder(made.get("encoder", recorded.get("name")), int(made.get("image_size", 256)),
                                    weights=weights, pretrained=not made.get("random_init", False),
                                    seed=int(made.get("seed", 0)))
    want = recorded.get("weights_sha256")
    if want not in (None, UNKNOWN_DIGEST) and digest != want:
        raise ArtifactError(f"--augment reference encodes with {cfg.latents}'s encoder, but the weights found "
                            f"({weights or 'the timm / Hugging Face cache'}, sha256 {digest[:12]}) are not the ones "
                            f"it was made with ({want[:12]}); pass them with --encoder-weights")
    encoder = encoder.to(device).eval().requires_grad_(False)
    forward = torch.compile(encoder) if cfg.compile else encoder

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return forward(images).to(latent_dtype).float()

    return encode


def load_init(cfg: TrainDecoderConfig, training: DecoderTraining) -> None:
    """--init: the decoder and its EMA start from another decoder run's EMA weights, which must have
    this decoder's architecture (one line naming the first tensor that does not fit)."""
    source, _ = load_decoder_run(cfg.init)
    start_from(source.state_dict(), (training.decoder, training.ema), cfg.init, "decoder",
               "--model, --decoder-patch and the store's latent shape")


def _short(encoder: dict) -> str:
    return f"'{encoder.get('name')}' (weights {str(encoder.get('weights_sha256'))[:12]})"


def _why_different(cfg: TrainDecoderConfig, old: dict, wanted: dict) -> str:
    """Why the decoder run at --out is not the one asked for: its encoder, its store or its settings."""
    out = cfg.out
    if old.get("encoder") != wanted["encoder"]:
        return (f"{out} was trained on latents of encoder {_short(old.get('encoder') or {})}, but {cfg.latents} "
                f"holds latents of encoder {_short(wanted['encoder'])}; pass the store it was trained on, or "
                "--overwrite to start a new run there")
    if old.get("inputs", {}).get("latents", {}).get("content_id") != wanted["store"]:
        return (f"{out} was trained on another latent store than {cfg.latents} (same encoder, other content); "
                "pass the store it was trained on, or --overwrite to start over")
    return describe_difference(out, cfg, old)


def _prepare_run(cfg: TrainDecoderConfig, wanted: dict, identity: str, store_manifest: dict) -> str:
    """Rank 0: create, resume or refuse the run directory. Returns "done", "resume" or "new"."""
    out = Path(cfg.out)

    def reuse(old: dict) -> str | None:
        if old.get("kind") != "decoder-run":
            raise ArtifactError(f"{out} is a {old.get('kind')}, not a decoder run; choose another --out")
        return resume_if_same("decoder-run", identity)(old)

    state = claim_output(out, cfg.overwrite, reuse, different=lambda old: _why_different(cfg, old, wanted),
                         foreign=f"{out} exists and is not a rae run; choose another --out")
    if state:
        return state
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"latents": input_ref(cfg.latents, store_manifest)}
    if cfg.init:
        inputs["init"] = input_ref(cfg.init, read_manifest(cfg.init, kind="decoder-run", what="--init decoder run"))
    manifest = new_manifest("decoder-run", cfg, inputs=inputs,
                            identity=identity, **{k: v for k, v in wanted.items() if k not in ("config", "store")})
    write_manifest(out, manifest)
    return "new"


def _resume(training: DecoderTraining, out: Path, identity: str, d: dist.Dist) -> tuple[int, dict | None]:
    """Load the newest readable checkpoint into ``training``: (its step, the log interval it had
    open), or (0, None) when there is none."""
    found = resume_state(out, say=lambda line: console.print(line, highlight=False) if d.is_main else None)
    if found is None:
        return 0, None
    ckpt, saved = found
    if saved.get("identity") != identity:
        raise ArtifactError(f"{ckpt} belongs to another configuration than {out}/manifest.json; remove it or --overwrite")
    training.load_state_dict(saved["training"])
    return int(saved["step"]), saved.get("metrics")


def _reopen(cfg: TrainDecoderConfig, wanted: dict, mean: np.ndarray, var: np.ndarray, loss_nets: dict,
            start: int) -> list[dict]:
    """Rank 0, before the first step: the store's statistics and config.json ((re)written on every
    start: the same content, and a kill right after creation loses nothing), the loss networks in
    the manifest, the log cut back to ``start`` (returns its records)."""
    out = Path(cfg.out)
    save_weights(out / STATS, {"mean": torch.from_numpy(mean), "var": torch.from_numpy(var)})
    write_config(out, decoder_config(wanted["decoder"], cfg.model, wanted["encoder"], wanted["latent_shape"],
                                     latent_statistics={"file": STATS, **wanted["latent_statistics"]},
                                     noise_tau=cfg.noise_tau))
    manifest = read_manifest(out, require_complete=False)
    manifest["loss_networks"] = loss_nets
    write_manifest(out, manifest)
    (out / "previews").mkdir(exist_ok=True)
    return truncate_metrics(out, start)


def _preview_batch(cfg: TrainDecoderConfig, store, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents and images the previews reconstruct: fixed entries spread over the store (its
    classes are in order)."""
    valid = store.valid_indices()
    fixed = valid[np.linspace(0, len(valid) - 1, min(cfg.preview_count, len(valid))).round().astype(int)]
    z, _, images = _Reader(cfg.latents, image_size)(fixed)
    return z, images


class _Metrics:
    """Per-step metrics summed on the device and written as interval means to metrics.jsonl (rank 0).

    Losses are averaged over ranks (the global batch's values). ``step`` counts the steps done."""

    def __init__(self, out: Path | None, global_batch: int):
        self.out, self.global_batch = out, global_batch
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.t0 = 0, time.time()
        self.records: list[dict] = []

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def _summed_over_ranks(self) -> dict[str, float]:
        """The interval's sums, in float64, summed over ranks (a collective: every rank calls it)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device="cpu") for k in keys])
        return dict(zip(keys, dist.all_reduce_sum(values).tolist()))

    def partial_state(self) -> dict:
        """The interval logged so far, over all ranks. A checkpoint keeps it, so a run resumed between
        two log steps writes the same interval means as an uninterrupted one."""
        return {"sums": self._summed_over_ranks(), "counts": dict(self.counts), "steps": self.steps}

    def restore(self, state: dict | None, is_main: bool) -> None:
        """Continue the interval of ``partial_state``: its sums on rank 0 (they are over all ranks already)."""
        if state:
            self.sums = {k: v if is_main else 0.0 for k, v in state["sums"].items()}
            self.counts, self.steps = {k: int(v) for k, v in state["counts"].items()}, int(state["steps"])

    def flush(self, step: int, world: int, machine: dict | None = None) -> dict | None:
        if not self.steps:
            return None
        sums = self._summed_over_ranks()
        elapsed = max(time.time() - self.t0, 1e-9)
        record = {"step": step, **{k: v / world / self.counts[k] for k, v in sums.items()},
                  "img_per_s": self.steps * self.global_batch / elapsed, **(machine or {})}
        self.sums, self.counts, self.steps, self.t0 = {}, {}, 0, time.time()
        if self.out is not None:
            append_metrics(self.out, record)
            self.records.append(record)
        return record


def save_recon_grid(path: Path, originals: torch.Tensor, recons: torch.Tensor, per_row: int = 4) -> np.ndarray:
    """PNG of (original | reconstruction) pairs, ``per_row`` pairs per row, 2 px gaps; returns the grid."""
    from PIL import Image

    n, _, h, w = recons.shape
    originals = torch.nn.functional.interpolate(originals.float(), size=(h, w), mode="nearest") \
        if originals.shape[-1] != w else originals.float()
    per_row = min(per_row, n)
    rows, gap = math.ceil(n / per_row), 2
    canvas = np.full((rows * (h + gap) + gap, per_row * (2 * w + 3 * gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = gap + r * (h + gap), gap + c * (2 * w + 3 * gap)
        for k, img in enumerate((originals[i], recons[i] * 255)):
            pixels = img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            canvas[y: y + h, x + k * (w + gap): x + k * (w + gap) + w] = pixels
    Image.fromarray(canvas).save(path)
    return canvas


def _plot(out: Path, records: list[dict]) -> None:
    keys = ("l1", "lpips", "gan", "lambda", "d_loss", "d_accuracy", "lr")
    plot_metrics(records, out / "losses.png", {k: k for k in keys})


# ---------------------------------------------------------------------------------------------
# run


def source_images(cfg: TrainDecoderConfig) -> dict[str, str]:
    """The image folder the store was encoded from: the decoder reads it too (an input as --latents is)."""
    try:
        path = read_manifest(cfg.latents, require_complete=False)["inputs"]["images"]["path"]
    except (ArtifactError, KeyError, TypeError):
        return {}  # the stage itself says what is wrong with the store
    return {"the source images of --latents": path}


@stage(extra_inputs=source_images)
def run(cfg: TrainDecoderConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device))  # as the manifest says
    out = Path(cfg.out)
    store_manifest, store = open_complete_store(cfg.latents, kind=("latent-store",))
    dist.main_decides(lambda: check_source_images(store, store_manifest))  # before anything is written
    arch = decoder_architecture(cfg, store_manifest["encoder"], store.latent_shape)
    image_size = arch["grid"] * arch["patch_size"]
    if cfg.augment == "reference" and image_size != int(store.attrs["image_size"]):
        size = int(store.attrs["image_size"])
        fits = f"--decoder-patch {size // arch['grid']} for {size} px images from its {arch['grid']}x{arch['grid']} tokens"
        raise RaeError(f"--augment reference encodes crops of the decoder's size ({image_size} px), but the store's "
                       f"encoder takes {size} px images; give "
                       + (f"{fits}, or " if size % arch["grid"] == 0 else "") + "--augment none for an upsampling decoder")
    plan = BatchPlan.for_store(store, cfg.batch_size, cfg.seed, d.rank, d.world, flip=cfg.augment == "none")
    micro_batches(cfg.batch_size, d.world, cfg.grad_accum)
    schedule = Schedule.of(cfg, plan.steps_per_epoch)
    mean, var = store.statistics()
    wanted = {"config": cfg.identity(), "encoder": store_manifest["encoder"], "store": store_manifest.get("content_id"),
              "latent_shape": store_manifest["latent_shape"], "decoder": arch, "image_size": image_size,
              "latent_statistics": {"sha256": hashlib.sha256(mean.tobytes() + var.tobytes()).hexdigest(),
                                    "store_content_id": store_manifest.get("content_id")},
              "steps": schedule.total, "steps_per_epoch": schedule.steps_per_epoch}
    if cfg.init:
        wanted["init"] = read_manifest(cfg.init, kind="decoder-run", what="--init decoder run").get("content_id")
    identity = digest_json(wanted)
    state = dist.main_decides(lambda: _prepare_run(cfg, wanted, identity, store_manifest))
    if state == "done":
        if d.is_main:
            console.print(f"{out} is already complete; nothing to do.")
        return summary(out)

    lpips, disc, loss_nets = build_loss_networks(cfg)
    training = DecoderTraining(cfg, arch, schedule, d, lpips, disc, cfg.precision)
    if cfg.init:  # a resume below replaces these with the checkpoint's
        load_init(cfg, training)
    start, interval = _resume(training, out, identity, d)
    encode = (frozen_encoder(cfg, store_manifest, torch.float16 if store.latents.dtype == np.float16 else torch.float32,
                             d.device) if cfg.augment == "reference" else None)
    metrics = _Metrics(out if d.is_main else None, cfg.batch_size)
    metrics.restore(interval, d.is_main)
    previews = None
    if d.is_main:
        metrics.records = _reopen(cfg, wanted, mean, var, loss_nets, start)
        previews = _preview_batch(cfg, store, image_size)
        _announce(cfg, d, arch, schedule, start, loss_nets)

    t0 = time.time()
    evaluation = _Evaluation(cfg, store_manifest, training, d) if cfg.eval_every else None
    step = _train(cfg, training, plan, schedule, start, metrics, previews, identity, d, encode, evaluation)
    elapsed = time.time() - t0
    if step < schedule.total:  # stopped early on purpose (--stop-after): resumable
        result = {"run": str(out), "step": step, "steps": schedule.total, "complete": False}
    else:
        if d.is_main:
            _finalize(training, previews, out, metrics.records)
        dist.barrier()
        result = summary(out)
    result["images_per_second"] = (step - start) * cfg.batch_size / elapsed if elapsed > 0 and step > start else 0.0
    return result


def _train(cfg: TrainDecoderConfig, training: DecoderTraining, plan: BatchPlan, schedule: Schedule, start: int,
           metrics: _Metrics, previews, identity: str, d: dist.Dist, encode=None, evaluation=None) -> int:
    """Steps from ``start`` to the end or --stop-after: a record every --log-every steps, previews
    and the loss plot every --preview-every, checkpoints every --checkpoint-every. Returns the step
    reached. ``encode``: --augment reference's frozen encoder, run on each batch's fresh crops."""
    out = Path(cfg.out)
    stop = min(schedule.total, cfg.stop_after) if cfg.stop_after is not None else schedule.total
    every_epoch = max(schedule.steps_per_epoch, 1)
    ckpt_every, preview_every = cfg.checkpoint_every or every_epoch, cfg.preview_every or every_epoch
    per_rank = cfg.batch_size // d.world
    workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, min(8, (os.cpu_count() or 2) // d.world - 1))
    crop_seed = cfg.seed if encode is not None else None
    loader = batches(plan, _Reader(cfg.latents, training.decoder.image_size, crop_seed), start, stop,
                     num_workers=workers, pin_memory=d.device.type == "cuda")
    step = start
    tracker = open_tracker(cfg, out, start) if d.is_main else None
    waits = DataWait(loader)
    deadline, out_of_time = Deadline(cfg.stop_after_hours), False
    with progress(stop * cfg.batch_size, "train-decoder", unit="img", completed=start * cfg.batch_size) as advance, \
            closing(tracker):
        for z, _, images in waits:
            images = images.to(d.device, non_blocking=True)
            z = encode(images) if encode is not None else z.to(d.device, non_blocking=True)
            metrics.add(training.step(step, z, images, first=d.rank * per_rank))
            step += 1
            info = {}
            if step % cfg.log_every == 0 or step == schedule.total:  # (--stop-after keeps the interval open)
                record = metrics.flush(step, d.world, machine_record(waits, d.device))
                info = {k: record[k] for k in ("l1", "lpips", "gan", "d_loss") if k in record}
                if tracker is not None:
                    tracker.scalars(record)
                out_of_time = step < stop and deadline.due()
            advance(cfg.batch_size, **info)
            if cfg.snapshot_every and step % cfg.snapshot_every == 0 and d.is_main:
                save_snapshot(out, step, training.ema.state_dict())
            if evaluation is not None and (step % cfg.eval_every == 0 or step == schedule.total):
                scores = {"step": step, **evaluation.run()}
                if d.is_main:
                    append_metrics(out, scores)
                    console.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                               if k.startswith("eval/")), highlight=False)
                    if tracker is not None:
                        tracker.scalars(scores)
            if d.is_main and (step % preview_every == 0 or step == schedule.total):
                grid = _preview(training, previews, out / "previews" / f"step_{step:08d}.png")
                if tracker is not None:
                    tracker.image("reconstructions", step, grid)
                _plot(out, metrics.records)
            if step % ckpt_every == 0 or step == stop or out_of_time:
                partial = metrics.partial_state()
                if d.is_main:
                    save_checkpoint(out, step, {"step": step, "identity": identity, "metrics": partial,
                                                "training": training.state_dict()}, keep=cfg.keep_checkpoints)
                dist.barrier()
            if out_of_time:  # --stop-after-hours: checkpointed here; the same command goes on
                break
    return step


def _announce(cfg, d, arch, schedule: Schedule, start: int, loss_nets: dict) -> None:
    n_params = sum(math.prod(p) for p in _param_shapes(arch))
    what = "resuming at step %d" % start if start else "starting"
    console.print(f"train-decoder: {cfg.model} decoder ({n_params / 1e6:.2f}M parameters, p_d={arch['patch_size']}, "
                  f"{arch['grid'] * arch['patch_size']} px), {schedule.total} steps of {cfg.batch_size} "
                  f"({schedule.steps_per_epoch} per epoch) on {d.world} process(es), {cfg.precision}; {what}",
                  highlight=False)
    console.print(f"  LPIPS from step {schedule.losses.lpips_start}, D updates from step {schedule.losses.disc_start}, "
                  f"GAN term from step {schedule.losses.gan_start}", highlight=False)
    if cfg.random_loss_nets and (loss_nets["lpips"] or loss_nets["discriminator"]):
        console.print("[bold yellow]warning:[/] LPIPS (VGG16) and the discriminator backbone "
                      f"({cfg.disc_backbone}) have RANDOM weights (demonstration): the perceptual and GAN terms "
                      "are not the real ones and this decoder is not a real RAE decoder", highlight=False)


def _param_shapes(arch: dict):
    with torch.device("meta"):
        return [tuple(p.shape) for p in ViTDecoder(**arch).parameters()]


class _Evaluation:
    """--eval-every: the EMA decoder's reconstructions of --eval-num held-out images (--eval-data, the
    same encoder as the training store), scored in memory on every rank's share. Reads no training
    state and draws nothing, so training is the same with and without it."""

    def __init__(self, cfg: TrainDecoderConfig, store_manifest: dict, training: DecoderTraining, d: dist.Dist):
        manifest, store = open_complete_store(cfg.eval_data, kind=("latent-store",))
        check_compatible(store_manifest["encoder"], store_manifest["latent_shape"],
                         {"encoder": manifest["encoder"], "latent_shape": manifest["latent_shape"]}, cfg.eval_data)
        plain = store.valid_indices()[~np.asarray(store.flipped[:])[store.valid_indices()]]
        pick = plain[np.unique(np.linspace(0, len(plain) - 1, min(cfg.eval_num, len(plain))).round().astype(int))]
        self.n, self.mine = len(pick), dist.shard(np.arange(len(pick)), d.rank, d.world)
        self.entries, self.reader = pick, _Reader(cfg.eval_data, training.decoder.image_size)
        self.training, self.d, self.batch = training, d, max(1, cfg.batch_size // d.world)
        self.scorer = ReconScorer(cfg.eval_metrics, d, cfg.inception_weights, cfg.offline, training.lpips)

    def run(self) -> dict:
        def batches():
            for s in range(0, len(self.mine), self.batch):
                idx = self.mine[s: s + self.batch]
                z, _, originals = self.reader(self.entries[idx])
                recon = self.training.reconstruct(z.to(self.d.device))
                yield (pixels(recon.to(self.d.device)),
                       originals.to(self.d.device), torch.as_tensor(idx))

        return {**self.scorer.score(batches(), self.n), "eval/num": self.n}


def _preview(training: DecoderTraining, previews, path: Path) -> np.ndarray:
    z, images = previews
    return save_recon_grid(path, images, training.reconstruct(z).cpu())


def _finalize(training: DecoderTraining, previews, out: Path, records: list[dict]) -> None:
    """Rank 0: final weights, grids, plot, and the manifest marked complete (the last write)."""
    save_weights(out / DECODER_RAW, training.decoder.state_dict())
    save_weights(out / DECODER_EMA, training.ema.state_dict())
    _preview(training, previews, out / "reconstructions.png")
    _plot(out, records)
    remove_temporaries(out)
    manifest = read_manifest(out, require_complete=False)
    manifest[RECORDS] = file_records(out, DECODER_FILES)
    manifest["content_id"] = manifest[RECORDS][DECODER_EMA]["sha256"]
    manifest["final_metrics"] = records[-1] if records else {}
    manifest["complete"] = True
    write_manifest(out, manifest)


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="decoder-run", what="decoder run")
    return {"run": str(out), "step": manifest["steps"], "steps": manifest["steps"], "complete": True,
            "weights": str(Path(out) / DECODER_EMA), "content_id": manifest["content_id"],
            "final_metrics": manifest.get("final_metrics", {}), "encoder": manifest["encoder"]["name"]}
