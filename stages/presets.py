"""Named presets: the settings each stage uses for a named configuration of the whole pipeline.

``imagenet256`` is the paper's ImageNet 256x256 setup (DINOv2-B, ViT-XL decoder, DiT^DH-XL);
``demo`` is the embedded demonstration: the same code at tiny sizes, on generated data, for a CPU.
A preset only fills in defaults; options given on the command line win.
"""
from __future__ import annotations

from .errors import RaeError

PRESETS: dict[str, dict[str, dict]] = {
    "imagenet256": {
        "encode": dict(encoder="dinov2-b", image_size=256, random_init=False),
        # FID-50K protocol: exactly 50 samples of each of the 1000 classes.
        "sample": dict(per_class=50, solver="euler", steps=50),
        "decode": dict(batch_size=128),
    },
    "imagenet512": {
        "encode": dict(encoder="dinov2-b", image_size=512, random_init=False),
        "sample": dict(per_class=50, solver="euler", steps=50),
        "decode": dict(batch_size=64),
    },
    "demo": {
        # The DINOv2-with-registers architecture at width 96, random weights from seed 0.
        "encode": dict(encoder="dinov2-demo", image_size=64, random_init=True, seed=0, block_size=128,
                       num_workers=2),
        "sample": dict(per_class=4, steps=10, batch_size=32, block_size=64),
        "decode": dict(batch_size=32, chunk_size=64),
    },
}

DEMO_NOTE = ("this is the demonstration preset (tiny models with random-weight encoder on generated data); "
             "the real pipeline is `--preset imagenet256` on ImageNet, see README")


def preset_defaults(preset: str | None, stage: str) -> dict:
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise RaeError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(stage, {}))
