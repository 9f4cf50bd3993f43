"""Named presets: the settings each stage uses for a named configuration of the whole pipeline.

``imagenet256`` is the paper's ImageNet 256x256 setup (DINOv2-B, ViT-XL decoder, DiT^DH-XL);
``demo`` is the embedded demonstration: the same code at tiny sizes, on generated data, for a CPU.
A preset only fills in defaults; options given on the command line win.
"""
from __future__ import annotations

from .errors import RaeError

PRESETS: dict[str, dict[str, dict]] = {
    # The config defaults ARE the paper's ImageNet 256 recipe (DINOv2-B at 256, the ViT-XL decoder with p_d 16,
    # DiT^DH-XL: 800 epochs of 1024, lr 2e-4 held for 40 epochs then linear to 2e-5 at epoch 800, shift
    # sqrt(768*16*16 / 4096)); a preset lists only what differs from them.
    "imagenet256": {
        # Written as integers, as earlier versions did: a run's identity is the digest of its config's JSON, where
        # 40 and 40.0 differ, so a run started with this preset resumes only if they stay as they were.
        "train_diffusion": dict(warmup_epochs=40, decay_end_epoch=800, epochs=800),
        # FID-50K protocol: exactly 50 samples of each of the 1000 classes.
        "sample": dict(per_class=50),
    },
    "imagenet512": {
        # 448 px encoder input -> 32x32 tokens; ViT-XL with p_d 16 decodes them to 512x512.
        "encode": dict(image_size=512),
        # The released 512 DiT^DH-XL (DiTDH-XL_ep400) on [768, 32, 32] latents: the reference's 512 training
        # config (the 256 recipe, decay to epoch 800) stopped at epoch 400, as released; the shift follows
        # the latent, sqrt(32*32*768 / 4096) = sqrt(192). (That config's latent_size still says 16x16; the
        # sampling config's 32x32 is the one that fits the checkpoints.) Integers: see imagenet256.
        "train_diffusion": dict(warmup_epochs=40, decay_end_epoch=800, epochs=400),
        # The reference's 512 sampling config: 50 points, AutoGuidance by DiT^DH-S (ep20) at 1.5.
        "sample": dict(per_class=50, ag_scale=1.5),
        "decode": dict(batch_size=64),
    },
    "demo": {
        # The DINOv2-with-registers architecture at width 96, random weights from seed 0.
        "encode": dict(encoder="dinov2-demo", image_size=64, random_init=True, block_size=128, num_workers=2),
        # A 0.4M-parameter decoder for [96, 4, 4] latents (p_d 16 -> 64 px). LPIPS-VGG16 dominates the
        # CPU cost (~0.1 s per image), so the demo trains mostly on L1 and keeps the recipe's order at the
        # end: LPIPS and D updates from step 250, the GAN term from step 275 (300 steps of 16).
        # Random-weight LPIPS and discriminator (timm's small test ViT as its backbone): offline, CPU-sized.
        # The cached latents (--augment none): the encoder in the loop would double the demo's CPU time.
        "train_decoder": dict(model="vit-b", width=96, depth=3, heads=4, mlp_dim=384, steps=300, batch_size=16,
                              warmup_steps=10, lr=1e-3, final_lr=1e-4, disc_lr=1e-3, disc_final_lr=1e-4, ema_decay=0.95,
                              lpips_start_step=250, disc_start_step=250, gan_start_step=275, random_loss_nets=True,
                              disc_backbone="test_vit", log_every=5, preview_every=150, checkpoint_every=150,
                              num_workers=2, augment="none"),
        # A tiny DiT^DH (1.4M parameters): trunk width 96 and head width 128, both >= the demo's token
        # dimension 96 (the paper's width rule); 1000 steps of 64 take ~2.5 min on one CPU thread. The
        # shift is set, not derived: sqrt(96*4*4 / 4096) = 0.61 would move training towards low noise,
        # where these tiny latents are easy; a = 3 spends it at high noise, where the class layout is
        # decided (measured: samples whose nearest training latent has their class, 32% vs 14% at
        # a = 0.61 after 1000 steps; 46% vs 21% with CFG 3; chance 10%, real latents 66%).
        "train_diffusion": dict(model="ditdh-s", width=96, depth=4, num_heads=4, head_width=128, head_depth=2,
                                head_num_heads=4, batch_size=64, lr=3e-3, final_lr=3e-4, warmup_steps=0,
                                decay_end_step=1000, steps=1000, shift=3.0, ema_decay=0.99, log_every=50,
                                checkpoint_every=500, sample_every=500, num_samples=10, sample_steps=20,
                                num_workers=0),
        "sample": dict(per_class=8, steps=20, batch_size=32, block_size=64),
        "decode": dict(batch_size=32, chunk_size=64),
    },
}

DEMO_NOTE = ("this is the demonstration preset (tiny models with random-weight encoder on generated data); "
             "the real pipeline is `--preset imagenet256` on ImageNet, see README")


def preset_defaults(preset: str | None, stage: str | None) -> dict:
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise RaeError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(stage, {}))
