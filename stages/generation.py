"""Generating from a diffusion run, for every stage that does: ``rae sample`` (into a sample store) and
``rae eval --model`` (decoded and scored in memory). One place for the sampling options, the labels
and seeds of a set of samples, the loading of the model and its AutoGuidance guide, and one batch's
ODE solve, so both give the same latents for the same settings.

Sample ``i`` of a set starts from its own noise, drawn on the CPU from
``torch.Generator().manual_seed(seed + i)`` (edm2's per-seed determinism): a sample does not depend
on the batch it is in nor on the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import flow
from .artifacts.runs import DiffusionRun, load_diffusion_run
from .errors import RaeError
from .models import fp8
from .options import AT_LEAST_1, NON_NEGATIVE, POSITIVE, option, precision_option

NOISE = "torch.Generator().manual_seed(seed + index), CPU randn"

# The sampling options, made afresh for each config that takes them (a dataclass field belongs to one
# class). ``many``: the scale options take a comma list, one evaluation each (`rae eval --model`).
SAMPLING_OPTIONS = {
    "per_class": lambda: option(None, "Exactly K samples of every class (FID-50K: 50).", check=AT_LEAST_1),
    # --number, not --num: torchrun reads --num as an abbreviation of its own --numa-binding (torch 2.9+).
    "num": lambda: option(None, "N samples with random labels (seeded).", check=AT_LEAST_1, replaces=("per_class",),
                          flag="--number", alias="--num"),
    "classes": lambda: option(None, "Only these class indices (repeat the option)."),
    "seed": lambda: option(0, "Base seed: sample i starts from the noise of seed + i."),
    "solver": lambda: option("euler", "euler | heun | euler-ref (the authors' ODE sampler: their 50 time points = "
                             "--solver euler-ref --steps 49) | sde-euler | sde-heun (their SDE sampler: Euler-Maruyama "
                             "or Heun, its num_steps = --steps + 1) | dopri5 | dopri8 | bosh3 | fehlberg2 | adaptive_heun "
                             "(their adaptive ODE sampler, torchdiffeq, with --atol / --rtol).",
                             choices=flow.ALL_SOLVERS),
    "diffusion_form": lambda: option("sigma", "SDE: the diffusion D(t) of dx = [v - D score] dt + sqrt(2D) dW: "
                                     "sigma (D = norm t) | constant | linear | decreasing | increasing-decreasing.",
                                     choices=flow.SDE_FORMS),
    "diffusion_norm": lambda: option(1.0, "SDE: the diffusion's scale (norm).", check=NON_NEGATIVE),
    "last_step": lambda: option("Mean", "SDE: the last step from t = --last-step-size: Mean | Tweedie | Euler | none.",
                                choices=flow.LAST_STEPS),
    "last_step_size": lambda: option(0.04, "SDE: the size of the last step (and where the SDE steps end).",
                                     check=(lambda v: 0 < v < 1, "in (0, 1)")),
    "atol": lambda: option(1e-6, "Adaptive solvers: absolute tolerance.", check=POSITIVE),
    "rtol": lambda: option(1e-3, "Adaptive solvers: relative tolerance.", check=POSITIVE),
    "steps": lambda: option(50, "Solver steps (Heun: 2 model passes per step; 0 = no denoising: the pure-noise "
                            "baseline).", check=(lambda v: v >= 0, "0 (the pure-noise baseline) or more")),
    "shift": lambda: option(None, "Time shift (default: the one the run was trained with).", check=POSITIVE),
    "guidance": lambda: option("none", "none | cfg | autoguidance.", choices=("none", "cfg", "autoguidance")),
    "cfg_scale": lambda many=False: option((1.0,) if many else 1.0, "Classifier-free guidance scale (1 = none)"
                                           + ("; a comma list scores each." if many else ".")),
    "guide_model": lambda: option(None, "AutoGuidance: the guiding (smaller/earlier) diffusion run.", path=True),
    "ag_scale": lambda many=False: option((1.42,) if many else 1.42, "AutoGuidance scale (1.42: the paper's with "
                                          "DiT^DH-S)" + ("; a comma list scores each." if many else "."),
                                          check=NON_NEGATIVE),
    "guidance_interval": lambda: option((0.0, 1.0), "Guide only for t in [T_MIN, T_MAX] (model time, t = 1 is "
                                        "noise)."),
    "ema": lambda: option(True, "EMA weights or raw weights."),
    "step": lambda: option(None, "Use the weights of this training step (a snapshot or a kept checkpoint) instead "
                           "of the finished run's.", check=(lambda v: v >= 0, "a step, 0 or more")),
    "precision": lambda: precision_option(fp8=True),
}


@dataclass(frozen=True)
class Sampling:
    """How one set of samples is drawn: the solver and its steps, the guidance and its one scale, the
    weights and precision, the base seed. ``shift`` None: the run's training shift."""
    solver: str
    steps: int
    shift: float | None
    guidance: str
    scale: float
    interval: tuple[float, float]
    ema: bool
    precision: str
    seed: int
    options: tuple = ()  # the solver's own settings (SDE, adaptive), as (name, value) pairs

    @classmethod
    def of(cls, cfg, scale: float | None = None) -> "Sampling":
        """From a config with the sampling options; ``scale`` picks one of a comma list's scales."""
        if scale is None:
            scale = {"none": 1.0, "cfg": cfg.cfg_scale, "autoguidance": cfg.ag_scale}[cfg.guidance]
        return cls(cfg.solver, cfg.steps, cfg.shift, cfg.guidance, float(scale),
                   tuple(float(t) for t in cfg.guidance_interval), cfg.ema, cfg.precision, cfg.seed,
                   tuple((k, getattr(cfg, k)) for k in solver_options(cfg.solver)))

    def settings(self, shift: float) -> dict:
        """What an artifact records of it (a sample store's manifest, eval.json)."""
        return {"solver": self.solver, "steps": self.steps, "shift": shift, "guidance": self.guidance,
                "scale": self.scale, "interval": list(self.interval), "ema": self.ema, "precision": self.precision,
                "seed": self.seed, "noise": NOISE + (SDE_NOISE if self.solver in flow.SDE_SOLVERS else ""),
                **dict(self.options)}


SDE_OPTIONS = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")
ADAPTIVE_OPTIONS = ("atol", "rtol")
SOLVER_OPTIONS = SDE_OPTIONS + ADAPTIVE_OPTIONS


def solver_options(solver: str) -> tuple[str, ...]:
    """The options that the solver reads (the others do not change its samples)."""
    if solver in flow.SDE_SOLVERS:
        return SDE_OPTIONS
    if solver in flow.ADAPTIVE_SOLVERS:
        return ADAPTIVE_OPTIONS
    return ()


SDE_NOISE = "; the SDE's noise from a generator per sample on the device, seeded from SeedSequence([seed + index, 0x5DE])"


def check_sampling(cfg) -> None:
    """One line for sampling options that do not go together (after ``check_options``)."""
    if cfg.guidance == "autoguidance" and not cfg.guide_model:
        raise RaeError("--guidance autoguidance needs --guide-model RUN (a smaller or earlier diffusion run)")
    if cfg.guide_model and cfg.guidance != "autoguidance":
        raise RaeError("--guide-model is only used with --guidance autoguidance")
    t_min, t_max = cfg.guidance_interval
    if not 0 <= t_min < t_max <= 1:
        raise RaeError(f"--guidance-interval must be t_min t_max with 0 <= t_min < t_max <= 1 (got {t_min} {t_max})")
    if (cfg.per_class is None) == (cfg.num is None):
        raise RaeError("give exactly one of --per-class K (K samples of every class) or --number N (random labels)")


def sample_labels(cfg, num_classes: int) -> np.ndarray:
    """Labels of every sample, in set order: class-sorted for --per-class, seeded random for --num."""
    classes = np.arange(num_classes) if cfg.classes is None else np.asarray(cfg.classes, dtype=np.int64)
    if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise RaeError(f"--classes must be class indices in [0, {num_classes - 1}]")
    if cfg.per_class is not None:
        return np.repeat(classes, cfg.per_class).astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    return classes[rng.integers(0, len(classes), size=cfg.num)].astype(np.int64)


def sample_seeds(cfg, n: int) -> np.ndarray:
    return cfg.seed + np.arange(n, dtype=np.int64)


def _check_guide(run: DiffusionRun, guide: DiffusionRun) -> None:
    """The guide must live in the same latent space: same encoder, latent shape and classes."""
    for what, a, b in (("latent shape", run.latent_shape, guide.latent_shape),
                       ("encoder", {k: run.encoder.get(k) for k in ("name", "weights_sha256")},
                        {k: guide.encoder.get(k) for k in ("name", "weights_sha256")}),
                       ("number of classes", run.num_classes, guide.num_classes)):
        if a != b:
            raise RaeError(f"--guide-model {guide.path} has another {what} than --model ({b} vs {a})")


def load_models(cfg, device) -> tuple[DiffusionRun, DiffusionRun | None]:
    """The run of ``cfg.model`` (at ``cfg.step``) and, for AutoGuidance, its guide, checked to share its latent space."""
    if cfg.precision == "fp8" and (why := fp8.float8_supported(torch.device(device))):
        raise RaeError(why)
    model_run = load_diffusion_run(cfg.model, ema=cfg.ema, device=device, step=cfg.step)
    guide_run = load_diffusion_run(cfg.guide_model, ema=cfg.ema, device=device) if cfg.guidance == "autoguidance" else None
    if guide_run is not None:
        _check_guide(model_run, guide_run)
    return model_run, guide_run


def ready(model_run: DiffusionRun, guide_run: DiffusionRun | None, precision: str, compile: bool):
    """The networks that sample: float8 products with ``precision`` fp8, compiled with ``compile``."""
    model, guide = model_run.model, guide_run.model if guide_run else None
    if precision == "fp8":
        model, guide = (fp8.to_float8(m, m.per_token_linears()) if m is not None else None for m in (model, guide))
        for m in (model, guide):
            if m is not None and next(m.buffers()).device.type == "cuda":  # where Triton runs
                from .models import fp8_triton

                fp8_triton.enable(m)  # the casts before the blocks' float8 products as one-pass kernels
    if compile:
        model = torch.compile(model)
        guide = torch.compile(guide) if guide is not None else None
    return model, guide


def make_velocity(sampling: Sampling, model, y: torch.Tensor, null_label: int, guide_model=None):
    """The solver's velocity for labels ``y`` under the guidance of ``sampling``."""
    return flow.guided_velocity(model, y, method=sampling.guidance, scale=sampling.scale, interval=sampling.interval,
                                guide_model=guide_model, null_label=null_label)


@torch.inference_mode()
def sample_latents(model_run: DiffusionRun, model, labels, seeds, sampling: Sampling, shift: float,
                   guide=None, device="cpu", evaluations: list | None = None) -> torch.Tensor:
    """One batch: noise from the seeds -> ODE or SDE solve (state in float32) -> raw encoder space
    [B, C, h, w]. ``evaluations``: a list the number of velocity evaluations is appended to."""
    noise = flow.seeded_noise(seeds, model_run.latent_shape).to(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=noise.device)
    guided = make_velocity(sampling, model, y, model_run.null_label, guide)
    count = [0]

    def velocity(x, t):
        count[0] += 1
        return guided(x, t)

    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=sampling.precision in ("bf16", "fp8")):
        x = flow.sample(velocity, noise, sampling.steps, shift, sampling.solver, dict(sampling.options), seeds)
    if evaluations is not None:
        evaluations.append(count[0])
    return model_run.to_raw(x.float())
