"""The two trainers' config objects, below everything else in ``stages.train``: each stage
(``decoder``, ``diffusion``) and each step (``decoder_step``, ``diffusion_step``) reads its fields from
here, so neither imports the other. Also the quantities both trainers derive from a config the same
way: this rank's share of the global batch, and its split into micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

from ..artifacts.atomic import jsonable
from ..errors import RaeError
from ..models.decoder import DECODER_SIZES
from ..models.discriminator import DINO_TIMM_NAME
from ..options import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, option, precision_option
from .phema import MAX_STD


# Options both trainers take, made afresh for each config (a dataclass field belongs to one class). None
# of them changes what is learned: each is in both configs' RUN_ONLY.
RUN_OPTIONS = {
    "snapshot_every": lambda: option(None, "Keep the EMA weights of every N-th step for good in RUN/snapshots (never "
                                     "rotated away; `--step N` of sample and decode reads them).", check=AT_LEAST_1),
    "tensorboard": lambda: option(True, "TensorBoard event files in RUN/tensorboard (`tensorboard --logdir RUN`)."),
    "wandb": lambda: option(None, "Also log to this Weights & Biases project (needs the wandb package)."),
    "offline": lambda: option(False, "Never download the evaluation networks' weights."),
    "stop_after": lambda: option(None, "End this invocation after N steps (checkpointed; run again to go on), e.g. "
                                 "for wall-time limits.", check=AT_LEAST_1),
    "stop_after_hours": lambda: option(None, "End this invocation at the first log step after H hours of training "
                                       "(checkpointed; run again to go on): a scheduler's wall-time limit.",
                                       check=(lambda v: v > 0, "positive")),
}


@dataclass
class TrainDecoderConfig:
    latents: str = option(help="Latent store from `rae encode` (its source images are read too).", path=True)
    out: str = option(help="Run directory: weights, config.json, metrics, previews, checkpoints.", short="-o", path=True)
    # Decoder: a named size of DECODER_SIZES; the four overrides give tiny decoders for tests and the demonstration.
    model: str = option("vit-xl", "Decoder size: vit-b | vit-l | vit-xl.")
    decoder_patch: int = option(16, "Decoder patch size p_d; 2 x the encoder's upsamples (256 px tokens -> 512 px "
                                "images).", check=AT_LEAST_1)
    width: int | None = option(None, "Override the size's width (tiny decoders).", check=AT_LEAST_1)
    depth: int | None = option(None, "Override the size's depth.", check=AT_LEAST_1)
    # The field keeps the name the decoder (and every run's config.json) gives it; --num-heads as train-diffusion.
    heads: int | None = option(None, "Override the size's attention heads.", check=AT_LEAST_1, flag="--num-heads",
                               alias="--heads")
    mlp_dim: int | None = option(None, "Override the size's MLP hidden width.", check=AT_LEAST_1)
    # Data: the authors' recipe encodes a fresh random crop of each image every step.
    augment: str = option("reference", "reference (the authors' recipe: short side resized to 1.5x the size with "
                          "bicubic, a random crop, encoded by the store's frozen encoder every step) | none (the "
                          "store's cached center-crop latents: faster, not the paper's decoder).",
                          choices=("reference", "none"))
    encoder_weights: str | None = option(None, "--augment reference: the store's encoder weights file, when not "
                                         "where `rae encode` found it (checked by sha256).", path=True)
    init: str | None = option(None, "Start from the EMA weights of this decoder run (or `rae import decoder` "
                              "release) instead of random ones; optimiser and schedule start afresh.", path=True)
    # Loss (reference recipe).
    noise_tau: float = option(0.8, "Noise augmentation: sigma ~ tau * U(0, 1).", check=NON_NEGATIVE)
    lpips_weight: float = option(1.0, "w_L, weight of LPIPS; 0 turns it off.", check=NON_NEGATIVE)
    gan_weight: float = option(0.75, "w_G, weight of the adaptive GAN term; 0 turns it off.", check=NON_NEGATIVE)
    max_gan_lambda: float = option(1e4, "Cap of the adaptive GAN weight lambda.", check=NON_NEGATIVE)
    lpips_start_epoch: float = option(0, "LPIPS from this epoch.")
    disc_start_epoch: float = option(6, "Discriminator updates from this epoch.")
    gan_start_epoch: float = option(8, "GAN term in the decoder loss from this epoch.")
    lpips_start_step: int | None = option(None, "LPIPS from this step (wins over the epoch).")
    disc_start_step: int | None = option(None, "Discriminator updates from this step.")
    gan_start_step: int | None = option(None, "GAN term from this step.")
    # Loss networks: pretrained weights through timm / torch hub, or local files.
    disc_backbone: str = option(DINO_TIMM_NAME, "timm name of the frozen discriminator backbone (DINO ViT-S/8).")
    disc_weights: str | None = option(None, "Local DINO ViT-S/8 checkpoint (else timm / Hugging Face cache).", path=True)
    lpips_vgg_weights: str | None = option(None, "Local torchvision VGG16 weights (else the torch hub cache).",
                                           path=True)
    lpips_lin_weights: str | None = option(None, "Local LPIPS v0.1 vgg.pth (else the lpips package's copy).",
                                           path=True)
    random_loss_nets: bool = option(False, "Seeded random LPIPS and discriminator weights (demo only).")
    disc_aug_prob: float = option(1.0, "DiffAug probability.", check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    disc_cutout: float = option(0.0, "DiffAug cutout size.", check=UNIT_INTERVAL)
    # Optimisation (reference recipe: 16 epochs, batch 512, AdamW, 1 warm-up epoch, cosine to 2e-5).
    epochs: float = option(16, "Training length in epochs.", check=POSITIVE)
    steps: int | None = option(None, "Training length in steps (wins over --epochs).", check=AT_LEAST_1)
    batch_size: int = option(512, "Global batch size, whatever the number of GPUs.", check=AT_LEAST_1)
    grad_accum: int = option(1, "Micro-batches per step and GPU, to save memory (not maths).", check=AT_LEAST_1)
    lr: float = option(2e-4, "Peak learning rate of the decoder.", check=POSITIVE)
    final_lr: float = option(2e-5, "Learning rate at the end of the cosine decay.", check=NON_NEGATIVE)
    disc_lr: float = option(2e-4, "Peak learning rate of the discriminator heads.", check=POSITIVE)
    disc_final_lr: float = option(2e-5, "Final learning rate of the discriminator heads.", check=NON_NEGATIVE)
    warmup_epochs: float = option(1, "Linear warm-up from zero, in epochs.", check=NON_NEGATIVE)
    warmup_steps: int | None = option(None, "Warm-up in steps (wins over --warmup-epochs).", check=NON_NEGATIVE)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas.")
    weight_decay: float = option(0.0, "AdamW weight decay.", check=NON_NEGATIVE)
    ema_decay: float = option(0.9978, "EMA decay of the decoder weights.", check=UNIT_INTERVAL)
    clip_grad: float | None = option(None, "Clip the decoder's gradient norm to this (reference: off).", check=POSITIVE)
    precision: str = precision_option()
    seed: int = option(0, "Seed of initialisation, data order, noise and DiffAug.")
    # Run settings: they do not change the result, so a resume may change them.
    checkpoint_every: int | None = option(None, "Steps between checkpoints (default: once per epoch).",
                                          check=AT_LEAST_1)
    keep_checkpoints: int = option(2, "Checkpoints kept.", check=NON_NEGATIVE)
    preview_every: int | None = option(None, "Steps between reconstruction grids (default: once per epoch).",
                                       check=AT_LEAST_1)
    preview_count: int = option(8, "Fixed store entries shown in the grids.", check=NON_NEGATIVE)
    log_every: int = option(10, "Steps per metrics.jsonl record.", check=AT_LEAST_1)
    snapshot_every: int | None = RUN_OPTIONS["snapshot_every"]()
    tensorboard: bool = RUN_OPTIONS["tensorboard"]()
    wandb: str | None = RUN_OPTIONS["wandb"]()
    # Periodic evaluation of the EMA decoder on held-out data.
    eval_every: int | None = option(None, "Every N steps, reconstruct --eval-data with the EMA decoder: PSNR, SSIM and "
                                    "--eval-metrics in metrics.jsonl (eval/*).", check=AT_LEAST_1)
    eval_data: str | None = option(None, "A latent store of held-out images, made by `rae encode` with this store's "
                                   "encoder (e.g. ImageNet val).", path=True)
    eval_num: int = option(10000, "Images per evaluation (evenly spread over --eval-data).",
                           check=(lambda v: v >= 2, "at least 2"))
    eval_metrics: tuple[str, ...] = option(("fid", "lpips"), "Comma-separated, beside PSNR and SSIM: fid (rFID), "
                                           "lpips (the run's LPIPS network).")
    inception_weights: str | None = option(None, "rFID's Inception file, as `rae eval`'s.", path=True)
    offline: bool = RUN_OPTIONS["offline"]()
    stop_after: int | None = RUN_OPTIONS["stop_after"]()
    stop_after_hours: float | None = RUN_OPTIONS["stop_after_hours"]()
    num_workers: int = option(-1, "Data loading processes per rank (-1: the CPU cores / ranks, less one, at most 8).")
    device: str = option("auto", "auto | cuda | cpu.")
    compile: bool = option(False, "torch.compile the transformer blocks and LPIPS.")
    overwrite: bool = option(False, "Replace a run made with another configuration or input.")

    RUN_ONLY = ("latents", "out", "grad_accum", "checkpoint_every", "keep_checkpoints", "preview_every", "preview_count",
                "log_every", "num_workers", "device", "compile", "overwrite", "encoder_weights", "init", "eval_every",
                "eval_data", "eval_num", "eval_metrics", "inception_weights", *RUN_OPTIONS)

    def identity(self) -> dict:
        """The fields that define the trained decoder (compared on resume). The --init source enters
        by its content id (the stage adds it); ``augment`` "none" is left out, as runs made before the
        option existed trained that way."""
        return {k: v for k, v in jsonable(self).items()
                if k not in self.RUN_ONLY and not (k == "augment" and v == "none")}


def decoder_size(cfg: TrainDecoderConfig) -> dict:
    """The named size from DECODER_SIZES with any of width/depth/heads/mlp_dim overridden."""
    size = dict(DECODER_SIZES[cfg.model])
    size.update({k: getattr(cfg, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None})
    return size


@dataclass
class TrainDiffusionConfig:
    latents: str = option(help="Latent store made by `rae encode` (must be complete).", path=True)
    out: str = option(help="Run directory (created, or resumed when it exists).", short="-o", path=True)
    model: str = option("ditdh-xl", "dit-s | dit-b | dit-l | dit-xl | ditdh-s | ditdh-b | ditdh-xl.")
    # Architecture overrides for ablations (None: the named size's value).
    width: int | None = option(None, "Override the (trunk) width.", check=AT_LEAST_1)
    depth: int | None = option(None, "Override the (trunk) depth.", check=AT_LEAST_1)
    num_heads: int | None = option(None, "Override the (trunk) number of heads.", check=AT_LEAST_1)
    head_width: int | None = option(None, "DiT^DH: override the head width (2048).", check=AT_LEAST_1)
    head_depth: int | None = option(None, "DiT^DH: override the head depth (2).", check=AT_LEAST_1)
    head_num_heads: int | None = option(None, "DiT^DH: override the head's number of heads (16).", check=AT_LEAST_1)
    # The reference's architecture switches (its LightningDiT / DiTwDDTHead arguments); the defaults are the paper's.
    qk_norm: bool = option(False, "QK-norm: queries and keys RMS-normalised per head before RoPE (LightningDiT's "
                           "remedy for loss spikes).")
    swiglu: bool = option(True, "SwiGLU MLP (--no-swiglu: GELU-tanh MLP of 4x width).")
    rmsnorm: bool = option(True, "RMSNorm (--no-rmsnorm: LayerNorm without affine parameters).")
    rope: bool = option(True, "2-D RoPE in attention.")
    pos_embed: bool = option(True, "Fixed 2-D sin-cos position embedding at the input.")
    wo_shift: bool = option(False, "adaLN without shifts (scale and gate only).")
    # Flow matching.
    time_dist: str = option("logit_normal", "Training time distribution: logit_normal | uniform.",
                            choices=("logit_normal", "uniform"))
    t_mean: float = option(0.0, "Logit-normal mean.")
    t_std: float = option(1.0, "Logit-normal standard deviation.", check=POSITIVE)
    shift: float | None = option(None, "Time shift a (default: sqrt(C*h*w / shift-base), sqrt(48) for [768, 16, 16] "
                                 "latents).", check=POSITIVE)
    shift_base: int = option(4096, "Base dimension n of the shift a = sqrt(m / n).", check=POSITIVE)
    use_shift: bool = option(True, "No time shift (a = 1), for ablations.", flag="--no-shift")
    label_dropout: float = option(0.1, "Probability of training a label as the null class.", check=UNIT_INTERVAL)
    # Optimisation (the released DiT^DH-XL recipe).
    batch_size: int = option(1024, "Global batch size, for any number of GPUs.", check=AT_LEAST_1)
    lr: float = option(2e-4, "Peak learning rate.", check=POSITIVE)
    final_lr: float = option(2e-5, "Learning rate at the end of the decay.", check=NON_NEGATIVE)
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    weight_decay: float = option(0.0, "AdamW weight decay.", check=NON_NEGATIVE)
    warmup_epochs: float = option(40.0, "Epochs before the decay starts.", check=NON_NEGATIVE)
    decay_end_epoch: float = option(800.0, "Epoch where the learning rate reaches --final-lr.")
    warmup_steps: int | None = option(None, "Warm-up length in steps (instead of epochs).", check=NON_NEGATIVE)
    decay_end_step: int | None = option(None, "End of the decay in steps (instead of epochs).")
    warmup_from_zero: bool = option(False, "Ramp the learning rate up from 0 during warm-up (the released config "
                                    "holds it constant).")
    grad_clip: float = option(1.0, "Gradient norm clipping (0: none).", check=NON_NEGATIVE)
    ema_decay: float = option(0.9995, "EMA decay per step.", check=UNIT_INTERVAL)
    phema: tuple[float, ...] | None = option(None, "Post-hoc EMA (EDM2): also track power-function EMAs of these "
                                             "relative standard deviations (e.g. 0.05,0.10), saved at every "
                                             "--snapshot-every step and at the end; `rae ema RUN --std S` then makes "
                                             "the EMA of any other length from them.",
                                             check=(lambda v: 0 < v <= MAX_STD, f"in (0, {MAX_STD}]"))
    precision: str = precision_option()
    seed: int = option(0, "Seed of the initial weights, the data order and every draw.")
    # Run settings: they do not change what is learned, so a resume may change them.
    epochs: float = option(800.0, "Training length in epochs.", check=POSITIVE)
    steps: int | None = option(None, "Training length in steps (wins over --epochs).", check=AT_LEAST_1)
    grad_accum: int = option(1, "Micro-batches per step and GPU, to save memory (not maths).", check=AT_LEAST_1)
    grad_checkpointing: int = option(0, "Recompute the activations of the first N blocks in the backward pass to "
                                     "save memory (-1: all).", check=(lambda v: v >= -1, "a number of blocks, or -1 for all"))
    compile: bool = option(False, "torch.compile the model.")
    log_every: int = option(100, "Steps between metrics.jsonl records.", check=AT_LEAST_1)
    checkpoint_every: int = option(5000, "Steps between checkpoints.", check=AT_LEAST_1)
    keep_checkpoints: int = option(2, "Checkpoints kept on disk.", check=AT_LEAST_1)
    sample_every: int = option(10000, "Steps between EMA latent samples in RUN/samples (0: only at the end).",
                               check=NON_NEGATIVE)
    num_samples: int = option(8, "EMA samples each time.", check=NON_NEGATIVE)
    sample_steps: int = option(50, "Euler steps of those samples.", check=AT_LEAST_1)
    init: str | None = option(None, "Start from the EMA weights of this diffusion run (or `rae import diffusion` "
                              "release) instead of random ones; optimiser and schedule start afresh.", path=True)
    snapshot_every: int | None = RUN_OPTIONS["snapshot_every"]()
    decoder: str | None = option(None, "A decoder run for the store's encoder: the periodic EMA samples are also "
                                 "decoded, as image grids RUN/samples/step_N.png.", path=True)
    # Periodic evaluation: K EMA samples (seeds 0..K-1, classes in turn), decoded and scored in memory.
    eval_every: int | None = option(None, "Every N steps, score --eval-num EMA samples against --eval-ref (needs "
                                    "--decoder); records eval/fid, eval/fd_dinov2 in metrics.jsonl.", check=AT_LEAST_1)
    eval_num: int = option(10000, "Samples per evaluation.", check=(lambda v: v >= 2, "at least 2"))
    eval_ref: str | None = option(None, "The reference: an ADM reference batch .npz, statistics from `rae eval "
                                  "--save-ref`, or images.", path=True)
    eval_metrics: tuple[str, ...] = option(("fid", "fd_dinov2"), "Comma-separated: fid, fd_dinov2.")
    eval_steps: int = option(50, "Euler steps of the evaluation samples (no guidance).", check=AT_LEAST_1)
    eval_batch_size: int = option(128, "Samples per batch of an evaluation, per GPU.", check=AT_LEAST_1)
    inception_weights: str | None = option(None, "FID's Inception file, as `rae eval`'s.", path=True)
    dinov2_weights: str | None = option(None, "FD_DINOv2's DINOv2 weights file, as `rae eval`'s.", path=True)
    fd_model: str = option("vit_large_patch14_dinov2.lvd142m", "timm DINOv2 model of the FD, as `rae eval`'s.")
    fd_encoder: str | None = option(None, "A latent store: the FD in its RAE encoder's space, as `rae eval`'s.",
                                    path=True)
    offline: bool = RUN_OPTIONS["offline"]()
    tensorboard: bool = RUN_OPTIONS["tensorboard"]()
    wandb: str | None = RUN_OPTIONS["wandb"]()
    stop_after: int | None = RUN_OPTIONS["stop_after"]()
    stop_after_hours: float | None = RUN_OPTIONS["stop_after_hours"]()
    num_workers: int = option(-1, "Data loading processes per GPU (-1: the CPU cores per GPU, less one, at most 16).")
    device: str = option("auto", "auto | cuda | cpu.")
    overwrite: bool = option(False, "Replace a run made with another configuration.")

    RUN_ONLY = ("latents", "out", "epochs", "steps", "grad_accum", "grad_checkpointing", "compile",
                "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "num_samples",
                "sample_steps", "num_workers", "device", "overwrite", "init", "decoder", "eval_every", "eval_num",
                "eval_ref", "eval_metrics", "eval_steps", "eval_batch_size", "inception_weights", "dinov2_weights",
                "fd_model", "fd_encoder", *RUN_OPTIONS)

    # Options added after runs were made: at these values they are left out of the identity, so a run
    # started by an earlier rae resumes under this one.
    LATER = {"phema": None, "qk_norm": False, "swiglu": True, "rmsnorm": True, "rope": True, "pos_embed": True,
             "wo_shift": False}

    def identity(self) -> dict:
        """The fields that define what is learned (compared when a run is resumed)."""
        return {k: v for k, v in jsonable(self).items()
                if k not in self.RUN_ONLY and not (k in self.LATER and v == self.LATER[k])}

    def model_overrides(self) -> dict:
        names = ("width", "depth", "num_heads", "head_width", "head_depth", "head_num_heads")
        switches = dict(use_qknorm=self.qk_norm, use_swiglu=self.swiglu, use_rmsnorm=self.rmsnorm, use_rope=self.rope,
                        use_pos_embed=self.pos_embed, wo_shift=self.wo_shift)
        return {**{k: getattr(self, k) for k in names if getattr(self, k) is not None}, **switches}


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch (its positions in the step's draws)."""
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


def micro_batches(global_batch: int, world: int, grad_accum: int) -> int:
    """Samples per micro-batch on each rank; one line when the batch does not split evenly."""
    if global_batch % world:
        raise RaeError(f"the global batch {global_batch} is not divisible by {world} processes")
    per_rank = global_batch // world
    if per_rank % grad_accum:
        raise RaeError(f"the per-process batch {per_rank} (= {global_batch} / {world} processes) is not divisible by "
                       f"--grad-accum {grad_accum}")
    return per_rank // grad_accum
