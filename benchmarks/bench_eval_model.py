"""`rae eval --model` against `rae sample` on one GPU: DiT^DH-XL guided by DiT^DH-S (AutoGuidance, 50
Euler steps, bf16), decoded by the ViT-XL decoder and scored with FID, IS and FD_DINOv2 in memory, against
sampling alone into a sample store, same samples, same call. Random weights everywhere (the compute of
trained ones); each stage runs once on one batch first (warm-up: compilation, cuDNN autotuning), then on
``--num`` samples and on a third of them: the difference gives each route's cost per sample, the rest
its fixed cost (loading the networks and the reference), and the FID-50K times are fixed + 50,000 x
per sample. Prints the table last, naming the card.

    python benchmarks/bench_eval_model.py [--num 1536] [--batch 256] [--compile]
    python benchmarks/bench_eval_model.py --smoke      # CPU, tiny models: checks that the harness runs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_runs(root: Path, smoke: bool) -> dict:
    """A DiT^DH-XL and a DiT^DH-S diffusion run and a ViT-XL decoder run (tiny ones with ``smoke``), random weights."""
    from stages.artifacts.checkpoint import save_weights
    from stages.artifacts.manifest import new_manifest, write_manifest
    from stages.artifacts.runs import diffusion_config, write_config
    from stages.models.decoder import DECODER_SIZES, ViTDecoder
    from stages.models.dit import create_dit
    from stages.models.encoders import encoder_identity

    shape = (32, 4, 4) if smoke else (768, 16, 16)
    enc = encoder_identity("dinov2-b", 256, "0" * 64, pretrained=True)
    tiny = dict(width=64, depth=1, num_heads=2, head_width=64, head_depth=1, head_num_heads=2) if smoke else {}
    paths = {}
    for name, size in (("model", "ditdh-xl"), ("guide", "ditdh-s")):
        torch.manual_seed(len(name))
        dit = create_dit(size, in_channels=shape[0], input_size=shape[1], num_classes=1000, **tiny)
        with torch.no_grad():  # adaLN-zero starts at v = 0; any non-zero weights cost the same
            for p in dit.parameters():
                p.add_(0.02 * torch.randn_like(p))
        run = root / name
        run.mkdir()
        save_weights(run / "model_ema.safetensors", dit.state_dict())
        save_weights(run / "latent_stats.safetensors", {"mean": torch.zeros(shape), "var": torch.ones(shape)})
        write_config(run, diffusion_config(type(dit).__name__, dict(dit.config), size, shape, [], 1.0, enc,
                                           image_size=256))
        write_manifest(run, new_manifest("diffusion-run", {}, encoder=enc, latent_shape=list(shape), num_classes=1000,
                                         content_id=name, step=1, class_names=[], complete=True))
        paths[name] = run
    kwargs = (dict(in_dim=shape[0], grid=shape[1], patch_size=16, width=32, depth=1, heads=2, mlp_dim=64) if smoke
              else dict(in_dim=shape[0], grid=shape[1], patch_size=16, **DECODER_SIZES["vit-xl"]))
    decoder = ViTDecoder(**kwargs)
    run = root / "decoder"
    run.mkdir()
    save_weights(run / "decoder_ema.safetensors", decoder.state_dict())
    write_config(run, {"decoder": {"kwargs": kwargs},
                       "encoder": enc, "latent_shape": list(shape), "image_size": decoder.image_size})
    write_manifest(run, new_manifest("decoder-run", {}, encoder=enc, latent_shape=list(shape), content_id="decoder",
                                     complete=True))
    paths["decoder"] = run
    return paths


def write_metric_nets(root: Path, smoke: bool) -> tuple[Path, str, Path]:
    """Random-weight Inception (torch-fidelity's, in a torch hub cache) and DINOv2 files; reference statistics."""
    from unittest import mock

    import timm
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from safetensors.torch import save_file

    from stages.eval.refs import RefStats, save_ref_stats

    home = root / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("build-bench-weights", ["2048"])
    torch.save(net.state_dict(), home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    os.environ["TORCH_HOME"] = str(home)
    fd = "vit_small_patch14_dinov2.lvd142m" if smoke else "vit_large_patch14_dinov2.lvd142m"
    dino = timm.create_model(fd, pretrained=False, num_classes=0)
    weights = root / "dinov2.safetensors"
    save_file(dino.state_dict(), str(weights))
    ref = root / "ref.npz"
    save_ref_stats(ref, RefStats(mu=np.zeros(2048), sigma=np.eye(2048), dinov2_mu=np.zeros(dino.num_features),
                                 dinov2_sigma=np.eye(dino.num_features), meta={"source": "random"}))
    return weights, fd, ref


def main() -> None:
    from stages.eval.evaluate import EvalConfig
    from stages.eval.evaluate import run as eval_run
    from stages.sample import SampleConfig
    from stages.sample import run as sample_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.num, args.batch, args.steps = 8, 4, 2
    device = "cpu" if args.smoke else "cuda"
    os.environ.setdefault("RAE_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = write_runs(root, args.smoke)
        dino, fd, ref = write_metric_nets(root, args.smoke)
        common = dict(model=str(runs["model"]), guidance="autoguidance", guide_model=str(runs["guide"]),
                      steps=args.steps, device=device, compile=args.compile)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def sample(n: int, out: str) -> float:
            sync()
            t0 = time.perf_counter()
            sample_run(SampleConfig(**common, out=str(root / out), num=n, batch_size=args.batch,
                                    block_size=max(args.batch, 64), shard_size=64 if not args.smoke else 4))
            sync()
            return time.perf_counter() - t0

        def evaluate(n: int, out: str) -> tuple[float, dict]:
            sync()
            t0 = time.perf_counter()
            result = eval_run(EvalConfig(**common, decoder=str(runs["decoder"]), num=n, sample_batch_size=args.batch,
                                         ag_scale=(1.42,), ref=str(ref), metrics=("fid", "is", "fd_dinov2"),
                                         dinov2_weights=str(dino), fd_model=fd, offline=True, batch_size=args.batch,
                                         out=str(root / out)))
            sync()
            return time.perf_counter() - t0, result

        small = max(args.batch, args.num // 3)
        sample(args.batch, "warm.zarr")
        t_sample = (sample(small, "s1.zarr"), sample(args.num, "s2.zarr"))
        evaluate(args.batch, "warm.json")
        t_eval = (evaluate(small, "e1.json")[0], *evaluate(args.num, "e2.json"))
        result = t_eval[2]
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test: tiny sizes, not a benchmark)"
    print(f"\n## rae eval --model vs rae sample — {card}, torch {torch.__version__}")
    print(f"DiT^DH-XL + AutoGuidance DiT^DH-S, {args.steps} Euler steps, bf16{', compiled' if args.compile else ''}; "
          f"{args.num} samples in batches of {args.batch}; eval: ViT-XL decoder, FID + IS + FD_DINOv2 "
          f"(metrics {', '.join(f'{k} {v:.4g}' for k, v in result['metrics'].items())}, random weights)")
    print(f"| route | {small} samples | {args.num} samples | per sample | fixed | FID-50K (fixed + 50,000 x per sample) |")
    print("|---|---|---|---|---|---|")
    minutes = {}
    for what, (t1, t2, *_) in (("rae sample (into a store)", t_sample),
                               ("rae eval --model (sample, decode, score)", t_eval)):
        per = (t2 - t1) / (args.num - small)
        fixed = t1 - small * per
        minutes[what] = (fixed + 50000 * per) / 60
        print(f"| {what} | {t1:.1f} s | {t2:.1f} s | {per * 1000:.1f} ms | {fixed:.1f} s | {minutes[what]:.1f} min |")
    a, b = minutes.values()
    print(f"| eval --model / sample, FID-50K | | | | | {b / a:.3f} |")


if __name__ == "__main__":
    main()
