"""Images made in memory for ``rae eval --model RUN --decoder DEC``: samples of a diffusion run
(``stages.generation``, as ``rae sample`` draws them), rounded to the sample store's latent dtype,
decoded (as ``rae decode``) and turned into pixels (clamp, x255, truncate), then fed to the feature
collectors: the numbers of ``rae sample`` -> ``rae decode`` -> ``rae eval`` on the same seeds, without
the store, the PNGs or the .npz. Under ``torchrun`` the ranks share the sample batches round-robin.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..artifacts.runs import check_compatible, load_decoder_run
from ..generation import Sampling, load_models, ready, sample_labels, sample_latents, sample_seeds
from ..models.decoder import pixels
from ..progress import progress
from .features import Collector

LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class Generator:
    """The networks of one ``rae eval --model`` call, loaded once for every scale of a sweep."""

    def __init__(self, cfg, d):
        self.cfg, self.d = cfg, d
        self.run, self.guide_run = load_models(cfg, d.device)
        self.decoder, self.decoder_info = load_decoder_run(cfg.decoder, device=d.device)
        check_compatible(self.run.encoder, self.run.latent_shape, self.decoder_info, cfg.decoder)
        self.model, self.guide = ready(self.run, self.guide_run, cfg.precision, cfg.compile)
        self.decode = torch.compile(self.decoder) if cfg.compile else self.decoder
        self.labels = sample_labels(cfg, self.run.num_classes)
        self.seeds = sample_seeds(cfg, len(self.labels))
        self.shift = cfg.shift if cfg.shift is not None else self.run.shift

    def images(self, scale: float | None = None) -> "GeneratedImages":
        return GeneratedImages(self, Sampling.of(self.cfg, scale))


class GeneratedImages:
    """One set of generated images (one guidance scale): its size, what it is, and its feature pass."""

    kind = "generated"

    def __init__(self, gen: Generator, sampling: Sampling):
        self.gen, self.sampling = gen, sampling
        self.path = Path(gen.cfg.model)
        self.evaluations: list[int] = []  # velocity evaluations per batch, this rank's

    def __len__(self) -> int:
        return len(self.gen.labels)

    def identity(self) -> dict:
        """What eval.json records of the images: the runs (content ids), the sampling and the labels."""
        g, cfg = self.gen, self.gen.cfg
        run = {"path": str(Path(cfg.model).resolve()), "content_id": g.run.content_id, "step": cfg.step}
        return {"kind": self.kind, "path": run["path"], "model": run,
                "guide": None if g.guide_run is None else {"path": str(g.guide_run.path.resolve()),
                                                           "content_id": g.guide_run.content_id},
                "decoder": {"path": str(Path(cfg.decoder).resolve()), "content_id": g.decoder_info["content_id"]},
                "sampling": self.sampling.settings(g.shift), "latent_dtype": cfg.latent_dtype,
                "labels": {"per_class": cfg.per_class} if cfg.per_class is not None else {"num": cfg.num,
                                                                                          "seed": cfg.seed},
                "classes": cfg.classes, "seeds": [int(g.seeds[0]), int(g.seeds[-1])],
                "model_evaluations_per_batch": sorted(set(self.evaluations))}

    def feed(self, collector: Collector, batch_size: int, label: str) -> None:
        """Generate this rank's share and give the collector its images in batches of ``batch_size``
        (in index order, as ``rae eval`` reads image files)."""
        g, cfg, d = self.gen, self.gen.cfg, self.gen.d
        n, per = len(self), cfg.sample_batch_size
        mine = dist.shard([np.arange(s, min(s + per, n)) for s in range(0, n, per)], d.rank, d.world)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # images not yet fed, with their indices

        def flush(all_of_it: bool) -> None:
            nonlocal pending
            x, idx = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            cut = len(x) if all_of_it else len(x) - len(x) % batch_size
            for s in range(0, cut, batch_size):
                collector.update(x[s: s + batch_size], idx[s: s + batch_size])
            pending = [(x[cut:], idx[cut:])] if cut < len(x) else []

        autocast = dict(device_type=d.device.type, dtype=torch.bfloat16, enabled=cfg.precision in ("bf16", "fp8"))
        with progress(sum(len(b) for b in mine), label, unit="img") as advance, torch.no_grad():
            for idx in mine:
                z = sample_latents(g.run, g.model, g.labels[idx], g.seeds[idx], self.sampling, g.shift, g.guide,
                                   d.device, self.evaluations)
                z = z.to(LATENT_DTYPES[cfg.latent_dtype]).float()  # as a sample store keeps them
                with torch.autocast(**autocast):
                    images = g.decode(z)
                pending.append((pixels(images), torch.from_numpy(idx)))
                if sum(len(p[1]) for p in pending) >= batch_size:
                    flush(False)
                advance(len(idx))
            if pending:
                flush(True)

