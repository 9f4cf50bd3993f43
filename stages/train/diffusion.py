"""``rae train-diffusion``: a DiT / DiT^DH trained with flow matching on a latent store.

The recipe is the paper's (README, "`rae train-diffusion`"), with the released DiT^DH-XL config's
values as defaults: latents normalised with the store's exact statistics; x_t = (1 - t) x + t eps
with t logit-normal(0, 1) then shifted by a = sqrt(C*h*w / 4096); the model predicts v = eps - x
(mean squared error); labels dropped to the null class with probability 0.1 (for CFG); AdamW
lr 2e-4, betas (0.9, 0.95), no weight decay, batch 1024; the learning rate held for 40 epochs,
then decayed linearly to 2e-5 at epoch 800; gradient norm clipped to 1; EMA 0.9995.

The step itself (schedule, the step's random draws, ``DiffusionTraining``) is ``stages.train.diffusion_step``;
with the batches from ``stages.train.data.BatchPlan``, a run on N processes with gradient accumulation
computes the same gradients as a single process (to float rounding), and a resumed run is the same
run. This module is the stage: options, the run directory, resume, logs, samples.

Run directory: a diffusion run (``stages.artifacts.runs``: manifest.json, complete last, config.json,
latent_stats.safetensors, model.safetensors, model_ema.safetensors) with its training's
checkpoints/, metrics.jsonl and loss.png (``stages.train.runlog``) and samples/step_XXXXXXXX.safetensors.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import dist, flow
from ..artifacts.atomic import jsonable, remove_temporaries
from ..artifacts.checkpoint import resume_state, save_checkpoint, save_weights
from ..artifacts.image_folder import GRID_ROW, decode_grid, save_grid
from ..artifacts.manifest import (RECORDS, claim_output, create_artifact_dir, describe_difference, digest_json,
                                  file_records, input_ref, new_manifest, read_manifest, write_manifest)
from ..artifacts.outputs import stage
from ..artifacts.runs import (CONFIG, DIFFUSION_EMA, DIFFUSION_FILES, DIFFUSION_RAW, STATS, check_compatible,
                              denormalize, diffusion_config, load_decoder_run, load_diffusion_run, normalize,
                              save_phema_snapshots, save_snapshot, start_from, training_shift, write_config)
from ..artifacts.store import open_complete_store
from ..errors import ArtifactError, RaeError
from ..eval.live import LiveScorer
from ..models.decoder import pixels
from ..models.dit import DIT_SIZES, create_dit, width_rule_warning
from ..options import check_options, flag
from ..progress import console, progress
from .config import TrainDiffusionConfig, micro_batches
from .data import BatchPlan, StoreReader, batches
from .diffusion_step import DiffusionTraining, Schedule, learning_rate
from .runlog import append_metrics, plot_metrics, read_metrics, truncate_metrics
from .tracking import DataWait, Deadline, Tracker, closing, machine_record, open_tracker, require_wandb


def _validate(cfg: TrainDiffusionConfig) -> None:
    check_options(cfg)
    require_wandb(cfg.wandb)
    if cfg.phema and not cfg.snapshot_every:
        raise RaeError("--phema keeps its profiles at the snapshots: give --snapshot-every N too (EDM2 keeps one "
                       "every 8M images, e.g. every 8000 steps at batch 1024)")
    if cfg.phema and len(set(cfg.phema)) != len(cfg.phema):
        raise RaeError(f"--phema lists a standard deviation twice ({','.join(f'{v:g}' for v in cfg.phema)})")
    if cfg.eval_every and not (cfg.decoder and cfg.eval_ref):
        raise RaeError("--eval-every scores decoded samples: it needs --decoder DEC_RUN and --eval-ref REF")
    if cfg.model not in DIT_SIZES:
        raise RaeError(f"unknown --model {cfg.model!r}; choose one of {', '.join(DIT_SIZES)}")
    if cfg.model.startswith("dit-") and any(getattr(cfg, k) is not None for k in ("head_width", "head_depth", "head_num_heads")):
        raise RaeError(f"{cfg.model} has no wide head: --head-* options need a ditdh model")
    size = {**DIT_SIZES[cfg.model][1], **{k: getattr(cfg, k) for k in ("width", "num_heads", "head_width",
                                                                        "head_num_heads") if getattr(cfg, k)}}
    for width, heads in (("width", "num_heads"), ("head_width", "head_num_heads")):
        if width in size and (size[width] % size[heads] or cfg.rope and size[width] // size[heads] % 4):
            raise RaeError(f"{cfg.model}: {flag(width)} {size[width]} over {flag(heads)} {size[heads]} must give a "
                           "whole head dimension divisible by 4 (2-D RoPE)")


def _device_batches(loader, device: torch.device):
    """Yield (latents on the device, labels on the CPU); on CUDA the next batch is copied on a
    side stream while the current step runs."""
    if device.type != "cuda":
        for lat, labels in loader:
            yield lat.to(device), labels
        return
    stream = torch.cuda.Stream(device)
    pending = None
    for lat, labels in loader:
        with torch.cuda.stream(stream):
            moved = lat.to(device, non_blocking=True)
        if pending is not None:
            yield pending
        torch.cuda.current_stream(device).wait_stream(stream)
        moved.record_stream(torch.cuda.current_stream(device))
        pending = (moved, labels)
    if pending is not None:
        yield pending


class _LossLog:
    """The losses of the steps since the last record, left on the device until ``record`` brings
    them to the host (one sync per record) and stops the run on a non-finite one. Rank 0 appends
    the records to metrics.jsonl."""

    def __init__(self, out: Path, start: int, schedule: Schedule, global_batch: int, is_main: bool):
        self.out, self.schedule, self.global_batch, self.is_main = out, schedule, global_batch, is_main
        self.records = read_metrics(out) if is_main else []
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm)
        self.t, self.step, self.last_checkpoint = time.time(), start, start

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, loss, grad_norm))

    def record(self, step_done: int, lr: float, machine: dict | None = None) -> dict:
        steps = [s for s, _, _ in self.pending]
        vals = torch.stack([torch.stack([loss, g]) for _, loss, g in self.pending]).float()  # [k, 2]
        bad = (~vals.isfinite()).any(dim=1).float()
        dist.all_reduce_sum(vals)
        dist.all_reduce_sum(bad)
        vals, bad = vals.cpu(), bad.cpu()
        self.pending.clear()
        if bad.any():
            kept = (f"the last good checkpoint (step {self.last_checkpoint}) in {self.out / 'checkpoints'} is intact"
                    if self.last_checkpoint > 0 else "no checkpoint had been written yet")
            first = steps[int(bad.nonzero()[0])]
            raise RaeError(f"training diverged: the loss or gradient became NaN/inf at step {first}; "
                           f"{kept}. Check the latent store for bad values or lower --lr, then run the command again")
        now, world = time.time(), dist.world_size()
        rec = {"step": step_done, "epoch": round(step_done / self.schedule.steps_per_epoch, 4),
               "loss": float(vals[:, 0].mean()) / world, "grad_norm": float(vals[:, 1].mean()) / world, "lr": lr,
               "img_per_s": (step_done - self.step) * self.global_batch / max(now - self.t, 1e-9), **(machine or {})}
        self.t, self.step = now, step_done
        if self.is_main:
            self.records.append(rec)
            append_metrics(self.out, rec)
        return rec


#################################################################################
#                         Run directory: outputs and resume                     #
#################################################################################

@dataclass
class _Latents:
    """The training store and what it implies for the run."""
    manifest: dict
    plan: BatchPlan
    shape: tuple[int, int, int]
    class_names: list[str]
    num_classes: int
    mean: torch.Tensor
    var: torch.Tensor
    decoder: nn.Module | None = None  # --decoder: the periodic samples are decoded into grids


def _open_latents(cfg: TrainDiffusionConfig, d: dist.Dist) -> _Latents:
    manifest, store = open_complete_store(cfg.latents, kind=("latent-store",))
    C, h, w = store.latent_shape
    if h != w:
        raise ArtifactError(f"{cfg.latents}: latents [{C}, {h}, {w}] are not square; the models need h == w")
    class_names = list(store.attrs.get("class_names") or [])
    num_classes = int(store.attrs.get("num_classes", len(class_names)))
    mean, var = store.statistics()
    labels = np.asarray(store.labels[:])
    if len(labels) and labels.max() >= num_classes:
        raise ArtifactError(f"{cfg.latents}: labels go up to {labels.max()} but the store names {num_classes} classes")
    plan = BatchPlan.for_store(store, cfg.batch_size, cfg.seed, d.rank, d.world)
    micro_batches(cfg.batch_size, d.world, cfg.grad_accum)
    return _Latents(manifest, plan, (C, h, w), class_names, num_classes,
                    torch.from_numpy(mean.copy()), torch.from_numpy(var.copy()))


def load_init(cfg: TrainDiffusionConfig, trainer: DiffusionTraining, latents: _Latents) -> None:
    """--init: the model and its EMA start from another run's EMA weights (a release imported with
    `rae import diffusion`, or a run of rae's), which must be this model on these latents: one line
    naming what does not fit."""
    source = load_diffusion_run(cfg.init)
    if source.latent_shape != list(latents.shape) or source.num_classes != latents.num_classes:
        raise ArtifactError(f"--init {cfg.init} models latents {source.latent_shape} of {source.num_classes} classes, "
                            f"the store has {list(latents.shape)} of {latents.num_classes}")
    start_from(source.model.state_dict(), (trainer.model, trainer.ema), cfg.init, "model",
               "--model and its overrides")


def _intact(out: Path) -> None:
    """A run to resume has what its creation wrote in one step (written before anything else)."""
    for name in (CONFIG, STATS):
        if not (out / name).is_file():
            raise ArtifactError(f"it has no {name}")


def _prepare_run(cfg: TrainDiffusionConfig, identity: str, config: dict, manifest: dict, latents: _Latents,
                 total_steps: int) -> str:
    """Rank 0: create, resume or refuse the run directory. Returns "new", "resume" or "done"."""
    out = Path(cfg.out)

    def reuse(old: dict) -> str | None:
        if old.get("kind") == "diffusion-run" and old.get("identity") == identity:
            return "done" if old.get("complete") and old.get("step", 0) >= total_steps else "resume"
        return None

    state = claim_output(out, cfg.overwrite, reuse,
                         different=lambda old: describe_difference(
                             out, cfg, old, {"latents": latents.manifest.get("content_id")}),
                         foreign=f"{out} exists and is not a rae run; choose another --out", intact=_intact)
    if state:
        return state

    def build(folder: Path) -> None:
        (folder / "samples").mkdir(parents=True)
        # The store's exact statistics travel with the model: sampling must undo the same normalisation.
        save_weights(folder / STATS, {"mean": latents.mean, "var": latents.var})
        write_config(folder, config)
        write_manifest(folder, manifest)

    create_artifact_dir(out, build)
    return "new"


def _resume(trainer: DiffusionTraining, out: Path, identity: str, total_steps: int, d: dist.Dist) -> int:
    """Load the newest readable checkpoint into ``trainer``; returns its step (0: none)."""
    found = resume_state(out, say=lambda line: console.print(line, highlight=False) if d.is_main else None)
    if found is None:
        return 0
    ckpt, saved = found
    if saved.get("identity") != identity:
        raise ArtifactError(f"{ckpt} belongs to another configuration; pass --overwrite to start again")
    trainer.load_state_dict(saved)
    start = int(saved["step"])
    if start > total_steps:
        raise RaeError(f"{out} is already trained to step {start}, past the requested {total_steps} steps")
    if d.is_main:
        console.print(f"resuming {out} from step {start}", highlight=False)
    return start


def _reopen(out: Path, cfg: TrainDiffusionConfig, start: int, total_steps: int) -> None:
    """Rank 0, before the first step: the log cut back to ``start``, the manifest unfinished again
    (this run's settings and length)."""
    truncate_metrics(out, start)
    manifest = read_manifest(out, require_complete=False)
    manifest.update(complete=False, total_steps=total_steps, config=jsonable(cfg))
    write_manifest(out, manifest)


@torch.no_grad()
def ema_samples(ema: nn.Module, n, latent_shape, num_classes: int, shift: float, steps: int,
                mean: torch.Tensor, var: torch.Tensor, autocast: dict) -> dict:
    """EMA samples in raw encoder space, always from the same noise (seeds 0..n-1, or the seeds ``n``
    when it is a tensor of them) and labels (the seed modulo the number of classes), so successive
    samples show progress."""
    device = next(ema.parameters()).device
    seeds = n if isinstance(n, torch.Tensor) else torch.arange(n, dtype=torch.int64)
    noise = flow.seeded_noise(seeds.tolist(), tuple(latent_shape))
    labels = seeds % num_classes if num_classes > 0 else torch.zeros(n, dtype=torch.int64)
    velocity = flow.guided_velocity(ema, labels.to(device))
    with torch.autocast(**autocast):
        x = flow.sample(velocity, noise.to(device), steps=steps, shift=shift, solver="euler")
    return {"latents": denormalize(x.float().cpu(), mean, var), "labels": labels, "seeds": seeds}


def evaluate_ema(scorer: LiveScorer, trainer: DiffusionTraining, cfg: TrainDiffusionConfig, latents: _Latents,
                 d: dist.Dist, compiled: tuple | None = None) -> dict:
    """--eval-every: --eval-num EMA samples (seeds 0..K-1, this rank's round-robin share), decoded and
    scored in memory against --eval-ref; every rank calls it. Its own seeded noise: training's draws
    are untouched, so the weights are the same with and without evaluation. ``compiled``: the EMA
    model and the decoder compiled (--compile; the compiled EMA reads the current weights)."""
    mine = torch.as_tensor(dist.shard(list(range(cfg.eval_num)), d.rank, d.world), dtype=torch.int64)
    ema, decoder = compiled or (trainer.ema, latents.decoder)

    def batches():
        for s in range(0, len(mine), cfg.eval_batch_size):
            idx = mine[s: s + cfg.eval_batch_size]
            z = ema_samples(ema, idx, latents.shape, latents.num_classes, trainer.shift, cfg.eval_steps,
                            latents.mean, latents.var, trainer.autocast)["latents"]
            with torch.no_grad(), torch.autocast(**trainer.autocast):
                images = decoder(z.to(d.device))
            yield pixels(images), idx

    return {**scorer.score(batches(), cfg.eval_num), "eval/num": cfg.eval_num}


def _save_samples(out: Path, step: int, trainer: DiffusionTraining, cfg: TrainDiffusionConfig, latents: _Latents,
                  tracker: Tracker | None = None) -> None:
    s = ema_samples(trainer.ema, cfg.num_samples, latents.shape, latents.num_classes, trainer.shift,
                    cfg.sample_steps, latents.mean, latents.var, trainer.autocast)
    save_weights(out / "samples" / f"step_{step:08d}.safetensors", s,
                 metadata={"step": step, "solver": "euler", "steps": cfg.sample_steps, "shift": trainer.shift,
                           "space": "raw encoder latents"})
    if latents.decoder is not None:
        grid = save_grid(out / "samples" / f"step_{step:08d}.png", decode_grid(latents.decoder, s["latents"]), GRID_ROW)
        if tracker is not None:
            tracker.image("samples", step, grid)



def _preview_decoder(cfg: TrainDiffusionConfig, latents: _Latents, device: torch.device) -> nn.Module | None:
    """--decoder on rank 0: the decoder run, checked against the store's encoder and latent shape."""
    if not cfg.decoder:
        return None
    decoder, info = load_decoder_run(cfg.decoder, device=device)
    check_compatible(latents.manifest.get("encoder") or {}, latents.shape, info, cfg.decoder)
    return decoder


def _plot(out: Path, records: list[dict]) -> None:
    plot_metrics(records, out / "loss.png", {"loss": "training loss (flow matching MSE)"}, panel=(720, 420), cols=1,
                 smooth=True)


#################################################################################
#                                      run                                      #
#################################################################################

def _resolve_workers(n: int) -> int:
    if n >= 0:
        return n
    per_process = (os.cpu_count() or 2) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(16, per_process - 1))


@stage
def run(cfg: TrainDiffusionConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    cfg = dataclasses.replace(cfg, precision=dist.resolve_precision(cfg.precision, d.device))  # as the manifest says
    if d.device.type == "cuda":
        # Under bf16 the float32 parts (optimizer, EMA, norms) may use TF32 matmuls; fp32 means fp32.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "bf16"
    latents = _open_latents(cfg, d)
    schedule = Schedule.of(cfg, latents.plan.steps_per_epoch)
    shift = training_shift(latents.shape, cfg.shift, cfg.shift_base) if cfg.use_shift else 1.0

    torch.manual_seed(cfg.seed)  # the same initial weights on every process and in every resume
    model = create_dit(cfg.model, in_channels=latents.shape[0], input_size=latents.shape[1],
                       num_classes=latents.num_classes, **cfg.model_overrides())
    warning = width_rule_warning(model.output_width, latents.shape[0])
    if warning and d.is_main:
        console.print(f"[bold red]{warning}[/]", highlight=False)
    config = diffusion_config(type(model).__name__, dict(model.config), cfg.model, latents.shape, latents.class_names,
                              shift, latents.manifest.get("encoder"), cfg.time_dist, cfg.t_mean, cfg.t_std)
    inputs = {"latents": input_ref(cfg.latents, latents.manifest)}
    wanted = {"config": cfg.identity(), "store": latents.manifest.get("content_id")}
    if cfg.init:
        inputs["init"] = input_ref(cfg.init, read_manifest(cfg.init, kind="diffusion-run", what="--init run"))
        wanted["init"] = inputs["init"]["content_id"]
    identity = digest_json(wanted)
    manifest = new_manifest("diffusion-run", cfg, inputs=inputs,
                            identity=identity, encoder=latents.manifest.get("encoder"),
                            latent_shape=list(latents.shape), num_classes=latents.num_classes,
                            class_names=latents.class_names, step=0, total_steps=schedule.total,
                            warnings=[warning] if warning else [])

    out = Path(cfg.out)
    state = dist.main_decides(lambda: _prepare_run(cfg, identity, config, manifest, latents, schedule.total))
    if state == "done":
        result = summary(out)
        if d.is_main:
            console.print(f"{out} is already trained to step {result['step']}; nothing to do.", highlight=False)
        return result
    trainer = DiffusionTraining(model, cfg, d.device, shift, latents.num_classes, d.rank, d.world)
    scorer = None
    if cfg.eval_every:  # every rank draws and scores its share of the evaluation samples
        latents.decoder = _preview_decoder(cfg, latents, d.device)
        scorer = LiveScorer(cfg.eval_ref, cfg.eval_metrics, d, cfg.inception_weights, cfg.dinov2_weights,
                            cfg.fd_model, cfg.fd_encoder, cfg.offline, cfg.eval_batch_size)
    elif cfg.decoder:  # rank 0 decodes the previews; a decoder that does not fit stops every rank
        dist.main_decides(lambda: setattr(latents, "decoder", _preview_decoder(cfg, latents, d.device)))
    if cfg.init:  # a resume below replaces these with the checkpoint's
        load_init(cfg, trainer, latents)
    start = _resume(trainer, out, identity, schedule.total, d) if state == "resume" else 0
    if d.is_main:
        _reopen(out, cfg, start, schedule.total)
    dist.barrier()

    t0 = time.time()
    stop = min(schedule.total, cfg.stop_after) if cfg.stop_after is not None else schedule.total
    records, stop = _train(cfg, identity, trainer, latents, schedule, start, stop, d, scorer)
    elapsed = time.time() - t0
    steps_run = stop - start
    speed = {"seconds": elapsed, "steps_run": steps_run,
             "images_per_second": steps_run * cfg.batch_size / elapsed if elapsed > 0 and steps_run else 0.0}
    if stop < schedule.total:  # stopped early on purpose (--stop-after[-hours]): checkpointed, resumable
        return {"run": str(out), "step": stop, "steps": schedule.total, "complete": False, **speed}
    if d.is_main:
        _finish(out, trainer, cfg, latents, schedule.total, records)
    dist.barrier()
    return {**summary(out), **speed, "complete": True, "warning": warning}


def _train(cfg: TrainDiffusionConfig, identity: str, trainer: DiffusionTraining, latents: _Latents, schedule: Schedule,
           start: int, stop: int, d: dist.Dist, scorer: LiveScorer | None = None) -> tuple[list[dict], int]:
    """Steps [start, stop): a record every --log-every steps, checkpoints (and the loss plot) every
    --checkpoint-every and at ``stop`` (or at the log step where --stop-after-hours runs out), EMA samples
    every --sample-every. Returns the log's records and the step reached.
    Every draw is a function of the step, so stopping at ``stop`` and running again gives the weights of
    an uninterrupted run (the log gains a record at ``stop``)."""
    out = Path(cfg.out)
    mean, var = latents.mean.to(d.device), latents.var.to(d.device)
    loader = batches(latents.plan, StoreReader(cfg.latents), start, stop,
                     num_workers=_resolve_workers(cfg.num_workers), pin_memory=d.device.type == "cuda")
    log = _LossLog(out, start, schedule, cfg.batch_size, d.is_main)
    tracker = open_tracker(cfg, out, start) if d.is_main else None
    compiled = (torch.compile(trainer.ema), torch.compile(latents.decoder)) if scorer is not None and cfg.compile else None
    waits = DataWait(_device_batches(loader, d.device))
    deadline, reached = Deadline(cfg.stop_after_hours), stop
    label = "train-diffusion" if d.world == 1 else f"train-diffusion ({d.world} processes)"
    with progress(schedule.total, label, unit="step", completed=start) as advance, closing(tracker):
        for step, (lat, labels) in zip(range(start, stop), waits):
            lr = learning_rate(step, cfg.lr, cfg.final_lr, schedule.warmup, schedule.decay_end, cfg.warmup_from_zero)
            log.add(step, *trainer.train_step(step, normalize(lat, mean, var), labels, lr))
            done = step + 1
            is_ckpt = done % cfg.checkpoint_every == 0 or done == stop
            is_sample = cfg.sample_every > 0 and done % cfg.sample_every == 0 and done != schedule.total
            is_eval = scorer is not None and (done % cfg.eval_every == 0 or done == schedule.total)
            if not (done % cfg.log_every == 0 or is_ckpt or is_sample or is_eval):
                advance(1)
                continue
            # Checkpoints and samples come after a record: it stops the run on a non-finite loss first.
            rec = log.record(done, lr, machine_record(waits, d.device))
            if tracker is not None:
                tracker.scalars(rec)
            if d.is_main and not console.is_terminal:
                console.print(f"step {done}/{schedule.total} loss {rec['loss']:.4f} grad_norm {rec['grad_norm']:.3f} "
                              f"lr {lr:.3g} {rec['img_per_s']:.0f} img/s", highlight=False)
            advance(1, loss=rec["loss"], lr=lr)
            if done < stop and deadline.due():  # out of wall time: checkpoint here and end
                is_ckpt, reached = True, done
            if is_eval:
                scores = {"step": done, **evaluate_ema(scorer, trainer, cfg, latents, d, compiled)}
                if d.is_main:
                    append_metrics(out, scores)
                    log.records.append(scores)
                    console.print(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                               if k.startswith("eval/")), highlight=False)
                    if tracker is not None:
                        tracker.scalars(scores)
            if is_ckpt:
                _checkpoint(out, done, identity, trainer, cfg, log)
            if cfg.snapshot_every and done % cfg.snapshot_every == 0 and d.is_main:
                save_snapshot(out, done, trainer.ema.state_dict())
                _save_phema(out, done, trainer)
            if is_sample and d.is_main and cfg.num_samples > 0:
                _save_samples(out, done, trainer, cfg, latents, tracker)
            if reached == done:
                break
    return log.records, reached


def _save_phema(out: Path, step: int, trainer: DiffusionTraining) -> None:
    if trainer.phema is not None:
        save_phema_snapshots(out, step, trainer.phema.stds, trainer.phema.gammas, trainer.phema.state_dict())


def _checkpoint(out: Path, step: int, identity: str, trainer: DiffusionTraining, cfg: TrainDiffusionConfig,
                log: _LossLog) -> None:
    if not trainer.weights_finite():
        raise RaeError(f"training diverged: non-finite weights at step {step}; the last good checkpoint "
                       f"(step {log.last_checkpoint}) is intact. Lower --lr, then run the command again")
    if log.is_main:
        save_checkpoint(out, step, {**trainer.state_dict(), "step": step, "identity": identity,
                                    "data": {"step": step, "seed": cfg.seed, "global_batch": cfg.batch_size}}, keep=cfg.keep_checkpoints)
        _plot(out, log.records)
    log.last_checkpoint = step


def _finish(out: Path, trainer: DiffusionTraining, cfg: TrainDiffusionConfig, latents: _Latents, total_steps: int,
            records: list[dict]) -> None:
    """Rank 0: final weights, samples and plot, then the manifest marked complete (the last write)."""
    save_weights(out / DIFFUSION_RAW, trainer.model.state_dict(), metadata={"step": total_steps})
    save_weights(out / DIFFUSION_EMA, trainer.ema.state_dict(), metadata={"step": total_steps})
    _save_phema(out, total_steps, trainer)  # the last step's profiles, whatever --snapshot-every
    if cfg.num_samples > 0:
        _save_samples(out, total_steps, trainer, cfg, latents)
    _plot(out, records)
    remove_temporaries(out)
    manifest = read_manifest(out, require_complete=False)
    files = file_records(out, DIFFUSION_FILES)
    manifest.update(step=total_steps, content_id=files[DIFFUSION_EMA]["sha256"], complete=True)
    manifest[RECORDS] = files
    write_manifest(out, manifest)


def summary(out: str | os.PathLike) -> dict:
    out = Path(out)
    manifest = read_manifest(out, kind="diffusion-run", what="diffusion run")
    records = [r for r in read_metrics(out) if "loss" in r]  # (evaluation records hold scores)
    return {"run": str(out), "step": manifest["step"], "model": manifest["config"]["model"],
            "latent_shape": manifest["latent_shape"], "num_classes": manifest["num_classes"],
            "final_loss": records[-1]["loss"] if records else None,
            "first_loss": records[0]["loss"] if records else None}
