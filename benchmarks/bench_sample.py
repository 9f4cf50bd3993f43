"""Benchmark generation on one GPU: DiT^DH-XL, 50 steps, AutoGuidance from DiT^DH-S, + ViT-XL decoding.

Side by side in the same process, on the same random weights (the reference models are built from
the reference checkout, randomised, and ours load their weights through
``from_reference_state_dict``):

  ours       ``stages.flow`` sampler + ``guided_velocity`` (the loop ``rae sample`` runs): AutoGuidance
             evaluates both models on the conditional batch only; solver "euler-ref" 49 steps
             (= the reference's 50 time points) and "euler" 50 steps;
  reference  the authors' loop: ``Sampler.sample_ode(sampling_method="euler", num_steps=50)`` over
             ``forward_with_autoguidance`` on the doubled [cond; null] batch whose null half it discards.

Both then decode with our ViT-XL decoder (the decoder's own parity is benchmarks/parity_decoder.py)
and convert to uint8. Timed in bf16 autocast + torch.compile (and the reference also in its default
fp32 with --fp32-reference). A parity check compares our guided sample with the reference's from the
same weights, labels and noise (relative difference max|ours - ref| / max|ref|). The table is printed
last, with the card's name.

    python benchmarks/bench_sample.py --reference /work/ref --n 512 --batch 128
    python benchmarks/bench_sample.py --reference /work/ref --smoke     # tiny models on CPU

The reference needs einops (and torchdiffeq; if that is missing a fixed-grid Euler ``odeint`` with
torchdiffeq's semantics stands in, which is all its "euler" path uses).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stages import flow  # noqa: E402
from stages.models.decoder import to_uint8  # noqa: E402
from stages.models.decoder import ViTDecoder, create_decoder  # noqa: E402

# Reference DiTwDDTHead constructor sizes (trunk, head).
XL = dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16])
S = dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16])
TINY_XL = dict(hidden_size=[64, 96], depth=[2, 1], num_heads=[4, 4])
TINY_S = dict(hidden_size=[32, 96], depth=[1, 1], num_heads=[2, 4])


def _euler_odeint(func, y0, t, method="euler", atol=None, rtol=None):
    """torchdiffeq.odeint(method="euler") on a fixed grid: y_{k+1} = y_k + (t_{k+1} - t_k) f(t_k, y_k),
    returning the state at every grid time."""
    if method != "euler":
        raise NotImplementedError("the torchdiffeq stand-in only does fixed-grid Euler")
    ys = [y0]
    for t0, t1 in zip(t[:-1], t[1:]):
        ys.append(ys[-1] + (t1 - t0) * func(t0, ys[-1]))
    return torch.stack(ys)


def import_reference(root: Path, extra_paths: list[str]):
    from parity_dit import import_reference as parity_import

    try:
        for p in extra_paths:
            sys.path.insert(0, p)
        import torchdiffeq  # noqa: F401
        stubbed = False
    except ImportError:
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = _euler_odeint
        sys.modules["torchdiffeq"] = stub
        stubbed = True
    _, _, Sampler, create_transport = parity_import(root, extra_paths)
    from stage2.models.DDT import DiTwDDTHead
    return DiTwDDTHead, Sampler, create_transport, stubbed


def build_pair(ref_cls, sizes: dict, common: dict, seed: int):
    """A randomised reference model and ours with the same weights."""
    from parity_dit import ours_from, randomize_

    torch.manual_seed(seed)
    ref = ref_cls(**sizes, **common).eval()
    randomize_(ref, torch.Generator().manual_seed(seed))
    return ref, ours_from(ref)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_loop(generate, n: int, batch: int, device) -> float:
    """img/s of ``generate(batch)`` over ``n`` images, after one untimed warm-up batch (compilation)."""
    generate(batch)
    sync(device)
    start = time.perf_counter()
    done = 0
    while done < n:
        generate(batch)
        done += batch
    sync(device)
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="reference checkout root (has src/stage2)")
    parser.add_argument("--extra-path", action="append", default=[], help="directory with einops/torchdiffeq")
    parser.add_argument("--n", type=int, default=512, help="images timed per configuration")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--scale", type=float, default=1.42, help="AutoGuidance scale")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fp32-reference", action="store_true", help="also time the reference in fp32 (slow)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="timed precision")
    parser.add_argument("--parity-batch", type=int, default=4)
    parser.add_argument("--rows", default="ag-ref,ag,ref-ag,none,ref-none,decode",
                        help="configurations to time, in order: ag-ref, ag, ref-ag, none, ref-none, decode "
                             "(decoding alone, over 8x --n images)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script runs")
    parser.add_argument("--parity-only", action="store_true", help="the parity check alone, no timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=16, help="latent grid: 16 (ImageNet 256) or 32 (ImageNet 512: "
                                                            "[768, 32, 32], decoded to 512 px; use --scale 1.5)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.smoke:
        args.n, args.batch, args.parity_batch = min(args.n, 4), min(args.batch, 2), min(args.parity_batch, 2)
        args.no_compile, args.precision = True, "fp32"  # bf16 autocast is slow on CPU
    C, H, classes = (32, 4, 10) if args.smoke else (768, args.grid, 1000)
    common = dict(input_size=H, in_channels=C, patch_size=1, mlp_ratio=4.0, num_classes=classes)
    shift = math.sqrt(C * H * H / 4096) if not args.smoke else math.sqrt(48)

    DiTwDDTHead, Sampler, create_transport, stubbed = import_reference(args.reference, args.extra_path)
    ref_xl, xl = build_pair(DiTwDDTHead, TINY_XL if args.smoke else XL, common, args.seed)
    ref_s, s = build_pair(DiTwDDTHead, TINY_S if args.smoke else S, common, args.seed + 1)
    torch.manual_seed(args.seed + 2)
    decoder = (ViTDecoder(C, H, 4, 32, 1, 2, 64) if args.smoke else create_decoder("vit-xl", C, H, 16)).eval()
    for m in (ref_xl, xl, ref_s, s, decoder):
        m.to(device).requires_grad_(False)
    ref_fn = Sampler(create_transport("Linear", "velocity", time_dist_shift=shift)).sample_ode(
        sampling_method="euler", num_steps=50)

    # ---- parity: our guided sample vs the reference's, same weights / labels / noise, fp32 -------
    # True fp32 on both sides: cuDNN's default TF32 would round the reference's patch-embedding
    # Conv2d to 10-bit mantissas (ours is a matmul, which PyTorch keeps in fp32 by default).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(args.seed + 3)
    noise = torch.randn(args.parity_batch, C, H, H, generator=gen).to(device)
    y = torch.randint(0, classes, (args.parity_batch,), generator=gen).to(device)
    y_both = torch.cat([y, torch.full_like(y, classes)])
    with torch.inference_mode():
        ref_out = ref_fn(torch.cat([noise, noise]), ref_xl.forward_with_autoguidance, y=y_both, cfg_scale=args.scale,
                         additional_model_forward=ref_s.forward, cfg_interval=(0.0, 1.0))[-1].chunk(2)[0]
        ours_out = flow.sample(flow.guided_velocity(xl, y, "autoguidance", args.scale, guide_model=s),
                               noise, steps=49, shift=shift, solver="euler-ref")
        parity_fp32 = ((ours_out - ref_out).abs().max() / ref_out.abs().max()).item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours_bf16 = flow.sample(flow.guided_velocity(xl, y, "autoguidance", args.scale, guide_model=s),
                                    noise, steps=49, shift=shift, solver="euler-ref")
        parity_bf16 = ((ours_bf16 - ref_out).abs().max() / ref_out.abs().max()).item()
        pix_ref, pix_ours = to_uint8(decoder(ref_out)), to_uint8(decoder(ours_out))
        pixel_diff = int(abs(pix_ref.astype(int) - pix_ours.astype(int)).max())
    print(f"parity (AutoGuidance {args.scale}, 50 points, fp32): rel {parity_fp32:.2e}; ours bf16 vs ref fp32: "
          f"rel {parity_bf16:.2e}; decoded uint8 max diff {pixel_diff}", flush=True)

    if args.parity_only:
        print(f"card: {card}")
        return

    # ---- speed --------------------------------------------------------------------------------
    compile_ = (lambda f: torch.compile(f)) if not args.no_compile else (lambda f: f)
    xl_c, s_c, dec_c = compile_(xl), compile_(s), compile_(decoder)

    def ours(solver, steps, guidance=True, precision=args.precision):
        def generate(b):
            z = torch.randn(b, C, H, H, device=device)
            yb = torch.randint(0, classes, (b,), device=device)
            v = flow.guided_velocity(xl_c, yb, "autoguidance" if guidance else "none", args.scale, guide_model=s_c)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                x = flow.sample(v, z, steps, shift, solver)
                img = dec_c(x)
            return to_uint8(img)
        return generate

    ref_fwd = {"xl": compile_(ref_xl.forward), "s": compile_(ref_s.forward)}

    def reference(guidance=True, precision=args.precision, compiled=True):
        xl_fwd = ref_fwd["xl"] if compiled else ref_xl.forward
        s_fwd = ref_fwd["s"] if compiled else ref_s.forward

        def generate(b):
            z = torch.randn(b, C, H, H, device=device)
            yb = torch.randint(0, classes, (b,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if guidance:  # as sample_ddp.py: doubled batch, null half discarded
                    original = ref_xl.forward
                    ref_xl.forward = xl_fwd  # forward_with_autoguidance calls self.forward
                    try:
                        x = ref_fn(torch.cat([z, z]), ref_xl.forward_with_autoguidance,
                                   y=torch.cat([yb, torch.full_like(yb, classes)]), cfg_scale=args.scale,
                                   additional_model_forward=s_fwd, cfg_interval=(0.0, 1.0))[-1].chunk(2)[0]
                    finally:
                        ref_xl.forward = original
                else:
                    x = ref_fn(z, xl_fwd, y=yb)[-1]
                img = dec_c(x)
            return to_uint8(img)
        return generate

    def decode_only(b):
        x = torch.randn(b, C, H, H, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            return to_uint8(dec_c(x))

    prec = args.precision + ("" if args.no_compile else " + compile")
    configs = {
        "ag-ref": (f"ours, AutoGuidance, euler-ref 49 steps (50 pts), {prec}", lambda: ours("euler-ref", 49)),
        "ag": (f"ours, AutoGuidance, euler 50 steps, {prec}", lambda: ours("euler", 50)),
        "ref-ag": (f"reference loop, AutoGuidance, 50 pts, {prec}", lambda: reference()),
        "none": (f"ours, no guidance, euler 50 steps, {prec}", lambda: ours("euler", 50, guidance=False)),
        "ref-none": (f"reference loop, no guidance, 50 pts, {prec}", lambda: reference(guidance=False)),
        "ref-ag-fp32": ("reference loop, AutoGuidance, 50 pts, fp32",
                        lambda: reference(precision="fp32", compiled=False)),
        "decode": (f"ViT-XL decoding + uint8 alone, {prec}", lambda: decode_only),
    }
    keys = args.rows.split(",") + (["ref-ag-fp32"] if args.fp32_reference else [])
    rows = {}
    for key in keys:
        name, make = configs[key]
        speed = time_loop(make(), args.n * (8 if key == "decode" else 1), args.batch, device)
        rows[key] = (name, speed)
        print(f"{name}: {speed:.2f} img/s", flush=True)
    print()
    print(f"## Sampling + decoding, [{C}, {H}, {H}] latents, {card}, batch {args.batch}, {args.n} images per row"
          f"{' (SMOKE: tiny models on CPU)' if args.smoke else ''}"
          f"{' (torchdiffeq stand-in)' if stubbed else ''}")
    print("| configuration (sample + ViT-XL decode + uint8) | img/s | FID-50K time |")
    print("|---|---|---|")
    for name, speed in rows.values():
        print(f"| {name} | {speed:.2f} | {50000 / speed / 60:.1f} min |")
    if "ag-ref" in rows and "ref-ag" in rows:
        print(f"| speed-up, AutoGuidance (ours euler-ref / reference) | {rows['ag-ref'][1] / rows['ref-ag'][1]:.2f}x | |")
    print(f"| parity: ours vs reference guided sample, fp32, rel max diff | {parity_fp32:.2e} | |")
    print(f"| parity: ours bf16 vs reference fp32, rel max diff | {parity_bf16:.2e} | |")
    print(f"card: {card}")


if __name__ == "__main__":
    main()
