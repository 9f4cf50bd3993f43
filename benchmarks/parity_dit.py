"""Parity of our DiT / DiT^DH and sampler with the authors' implementation (dev script).

    python benchmarks/parity_dit.py --reference /path/to/RAE [--extra-path DIR] [--real]

Builds the reference models (imported from the reference checkout) with random weights (the
zero-initialised adaLN / output layers are randomised too, otherwise every output is 0), loads
the same weights into ours through ``from_reference_state_dict``, and compares in float32 on
CPU (or on the GPU with ``--device cuda``, TF32 off): velocities, a one-step sample and a full reference-convention sample (num_steps = 50 time
points = 49 Euler steps) without guidance, with CFG (guidance interval) and with AutoGuidance.
Prints max |ours - ref| and that divided by max |ref|; the target is < 1e-5 relative. Our patch
embeddings run as a matrix product over tokens (faster); ``--conv-patch-embed`` runs them as the
reference's Conv2d, which makes the small cases bit-identical.

The reference needs einops and torchdiffeq (not dependencies of this project): install them
anywhere, e.g. ``pip install --target /tmp/refdeps einops torchdiffeq``, and pass
``--extra-path /tmp/refdeps``. Its unused imports of ``transformers`` and ``regex`` are stubbed
when those are missing. ``--real`` adds DiT^DH-S at [768, 16, 16] (velocity, one step with and without guidance, the
full 50-point sample without guidance; several minutes on a 2-core CPU).
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

from stages import flow  # noqa: E402
from stages.models.dit import config_from_reference_state_dict, from_reference_state_dict, to_reference_state_dict

TARGET = 1e-5


def import_reference(root: Path, extra_paths: list[str]):
    for p in extra_paths:
        sys.path.insert(0, p)
    sys.path.insert(0, str(root / "src"))
    for name, attrs in {"transformers": ["SwinModel"], "regex": ["B"]}.items():
        try:
            __import__(name)
        except ImportError:  # imported but unused by the reference model files
            stub = types.ModuleType(name)
            for a in attrs:
                setattr(stub, a, None)
            sys.modules[name] = stub
    from stage2.models.DDT import DiTwDDTHead
    from stage2.models.lightningDiT import LightningDiT
    from stage2.transport import Sampler, create_transport
    return DiTwDDTHead, LightningDiT, Sampler, create_transport


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights everywhere (fixed sin-cos / Fourier tables kept), so gates are non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("pos_embed", "t_embedder.W"):
                continue
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")) or "norm_final" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))


CONV_PATCH_EMBED = False  # --conv-patch-embed: our patch embeddings run the reference's Conv2d itself


def ours_from(ref_model, heads: dict | None = None):
    cls, kwargs = config_from_reference_state_dict(ref_model.state_dict())
    kwargs.update(heads or {})  # a model without RoPE tables does not show its heads
    model = cls(**kwargs)
    model.load_state_dict(from_reference_state_dict(ref_model.state_dict()), strict=True)
    for m in model.modules():
        if hasattr(m, "conv_forward"):
            m.conv_forward = CONV_PATCH_EMBED
    return model.eval()


def report(rows, name, ours, ref):
    diff = (ours - ref).abs().max().item()
    rel = diff / ref.abs().max().item()
    rows.append(rel)
    print(f"  {name:<52} max|diff| {diff:.3e}   rel {rel:.3e}   {'ok' if rel < TARGET else 'FAIL'}")


@torch.no_grad()
def compare(label, ref_cls, ref_kwargs, guide_kwargs, Sampler, create_transport, batch, steps_full,
            seed, rows, guided_full=True, device="cpu", shift=math.sqrt(196608 / 4096), ag_scale=1.42, heads=None):
    print(f"{label} [{device}]:")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = ref_cls(**ref_kwargs).eval()
    fresh_state = {k: v.clone() for k, v in ref.state_dict().items()}
    randomize_(ref, gen)
    ours = ours_from(ref, heads)
    ref.to(device)
    ours.to(device)

    # Fixed tables computed by our code vs the reference's (fresh models).
    cls, kwargs = config_from_reference_state_dict(fresh_state)
    kwargs.update(heads or {})
    fresh_ours = to_reference_state_dict(cls(**kwargs))
    for key in sorted(fresh_ours):
        if key == "pos_embed" or key.endswith(("freqs_cos", "freqs_sin")):
            report(rows, f"fixed table {key}", fresh_ours[key], fresh_state[key])
    probe = ref_cls(**ref_kwargs)
    probe.load_state_dict(to_reference_state_dict(ours), strict=True)  # round trip loads
    del probe

    C, H = ref_kwargs["in_channels"], ref_kwargs["input_size"]
    num_classes = ref_kwargs.get("num_classes", 1000)
    x = torch.randn(batch, C, H, H, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    y[-1] = num_classes  # the null label too
    x, t, y = x.to(device), t.to(device), y.to(device)
    report(rows, "velocity", ours(x, t, y), ref(x, t, y))
    if guide_kwargs is None:
        return

    ref_sampler = Sampler(create_transport("Linear", "velocity", time_dist_shift=shift))
    noise = torch.randn(batch, C, H, H, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    noise, y = noise.to(device), y.to(device)
    y_both = torch.cat([y, torch.full_like(y, num_classes)])
    noise_both = torch.cat([noise, noise])

    torch.manual_seed(seed + 1)
    guide_ref = ref_cls(**guide_kwargs).eval()
    randomize_(guide_ref, gen)
    guide = ours_from(guide_ref)
    guide_ref.to(device)
    guide.to(device)

    cases = {
        "no guidance": (
            lambda fn: fn(noise, ref.forward, y=y)[-1],
            flow.guided_velocity(ours, y)),
        "CFG 4.0, interval [0, 1]": (
            lambda fn: fn(noise_both, ref.forward_with_cfg, y=y_both, cfg_scale=4.0,
                          cfg_interval=(0.0, 1.0))[-1].chunk(2)[0],
            flow.guided_velocity(ours, y, "cfg", 4.0, (0.0, 1.0))),
        "CFG 1.5, interval [0.1, 0.8]": (
            lambda fn: fn(noise_both, ref.forward_with_cfg, y=y_both, cfg_scale=1.5,
                          cfg_interval=(0.1, 0.8))[-1].chunk(2)[0],
            flow.guided_velocity(ours, y, "cfg", 1.5, (0.1, 0.8))),
        f"AutoGuidance {ag_scale}": (
            lambda fn: fn(noise_both, ref.forward_with_autoguidance, y=y_both, cfg_scale=ag_scale,
                          additional_model_forward=guide_ref.forward,
                          cfg_interval=(0.0, 1.0))[-1].chunk(2)[0],
            flow.guided_velocity(ours, y, "autoguidance", ag_scale, guide_model=guide)),
    }
    for num_points in (2, steps_full):
        fn = ref_sampler.sample_ode(sampling_method="euler", num_steps=num_points)
        for case, (run_ref, velocity) in cases.items():
            if num_points > 2 and case != "no guidance" and not guided_full:
                continue
            start = time.perf_counter()
            ref_out = run_ref(fn)
            ours_out = flow.sample(velocity, noise, steps=num_points - 1, shift=shift,
                                   solver="euler-ref")
            name = f"sample {num_points} pts ({num_points - 1} steps), {case}"
            report(rows, name, ours_out, ref_out)
            print(f"  {'':<52} ({time.perf_counter() - start:.1f}s)")


@torch.no_grad()
def compare_samplers(ref_cls, Sampler, create_transport, seed, rows, device="cpu", shift=math.sqrt(196608 / 4096)):
    """The reference's sample_sde (Euler-Maruyama and Heun, each diffusion form and last step) given the
    same noise sequence, and its sample_ode with adaptive torchdiffeq methods, against rae's."""
    common = dict(patch_size=1, mlp_ratio=4.0, num_classes=10)
    kwargs = dict(input_size=8, in_channels=32, hidden_size=[64, 96], depth=[2, 2], num_heads=[4, 4], **common)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = ref_cls(**kwargs).eval()
    randomize_(ref, gen)
    ours = ours_from(ref)
    ref.to(device)
    ours.to(device)
    batch = 3
    noise = torch.randn(batch, 32, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    velocity = flow.guided_velocity(ours, y)
    sampler = Sampler(create_transport("Linear", "velocity", time_dist_shift=shift))
    print(f"SDE and adaptive ODE samplers, DiT^DH tiny [{device}]:")
    for method in ("dopri5", "bosh3"):
        ref_out = sampler.sample_ode(sampling_method=method, num_steps=50, atol=1e-6, rtol=1e-3)(
            noise, ref.forward, y=y)[-1]
        report(rows, f"sample_ode {method} (num_steps 50, atol 1e-6, rtol 1e-3)",
               flow.sample(velocity, noise, 49, shift, method, {"atol": 1e-6, "rtol": 1e-3}), ref_out)
    real_randn = torch.randn
    for method, form, last, size, points in (("euler", "sigma", "Mean", 0.04, 50), ("heun", "sigma", "Mean", 0.04, 25),
                                             ("euler", "linear", "Tweedie", 0.04, 50),
                                             ("euler", "decreasing", "Euler", 0.02, 50),
                                             ("heun", "increasing-decreasing", "Mean", 0.04, 25),
                                             ("euler", "sigma", None, 0.04, 50)):  # ("constant" crashes there)
        draws = [real_randn(noise.shape, generator=gen).to(device) for _ in range(points - 1)]
        queue = list(draws)
        torch.randn = lambda *a, **k: queue.pop(0)
        try:
            ref_form = "inccreasing-decreasing" if form == "increasing-decreasing" else form  # (their spelling)
            ref_out = sampler.sample_sde(sampling_method=method, diffusion_form=ref_form, diffusion_norm=1.0,
                                         last_step=last, last_step_size=size, num_steps=points)(
                noise, ref.forward, y=y)[-1]
        finally:
            torch.randn = real_randn
        mine = list(draws)
        ours_out = flow.sample_sde(velocity, noise, points - 1, shift, method, noise_stream=lambda: mine.pop(0),
                                   diffusion_form=form, diffusion_norm=1.0, last_step=last or "none",
                                   last_step_size=size, reference=True)
        report(rows, f"sample_sde {method}, {form}, last step {last} {size}, {points} points", ours_out, ref_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="reference checkout root")
    parser.add_argument("--extra-path", action="append", default=[],
                        help="directory with einops/torchdiffeq for the reference (repeatable)")
    parser.add_argument("--real", action="store_true", help="also DiT^DH-S at [768, 16, 16]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32, TF32 off)")
    parser.add_argument("--samplers", action="store_true",
                        help="only the SDE and adaptive ODE samplers (shared weights and noise), tiny DiT^DH")
    parser.add_argument("--switches", action="store_true",
                        help="only the architecture switches (QK-norm, GELU MLP, LayerNorm, no RoPE), tiny models")
    parser.add_argument("--conv-patch-embed", action="store_true",
                        help="run our patch embeddings as the reference's Conv2d (default: the faster matmul form)")
    args = parser.parse_args()
    global CONV_PATCH_EMBED
    CONV_PATCH_EMBED = args.conv_patch_embed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    DiTwDDTHead, LightningDiT, Sampler, create_transport = import_reference(args.reference,
                                                                            args.extra_path)
    rows: list[float] = []
    common = dict(patch_size=1, mlp_ratio=4.0, num_classes=10)
    if args.samplers:
        compare_samplers(DiTwDDTHead, Sampler, create_transport, args.seed, rows, args.device)
        worst = max(rows)
        print(f"worst relative difference {worst:.3e} (target < {TARGET:.0e}): {'PASS' if worst < TARGET else 'FAIL'}")
        sys.exit(0 if worst < TARGET else 1)
    if args.switches:
        # The reference's switches that run in its code (its wo_shift passes None to its modulate, and its
        # DiTwDDTHead without RoPE calls tables it did not build: both crash there, so they have no parity).
        for what, sw in (("QK-norm", dict(use_qknorm=True)), ("GELU MLP", dict(use_swiglu=False)),
                         ("LayerNorm + QK-norm (LayerNorm)", dict(use_rmsnorm=False, use_qknorm=True))):
            compare(f"LightningDiT (DiT), tiny, {what}", LightningDiT,
                    dict(input_size=8, in_channels=32, hidden_size=64, depth=2, num_heads=4, **common, **sw),
                    None, Sampler, create_transport, 4, 50, args.seed, rows, device=args.device)
            compare(f"DiTwDDTHead (DiT^DH), tiny, {what}", DiTwDDTHead,
                    dict(input_size=8, in_channels=32, hidden_size=[64, 96], depth=[2, 2], num_heads=[4, 4], **common,
                         **sw), None, Sampler, create_transport, 4, 50, args.seed, rows, device=args.device)
        compare("LightningDiT (DiT), tiny, no RoPE", LightningDiT,
                dict(input_size=8, in_channels=32, hidden_size=64, depth=2, num_heads=4, use_rope=False, **common),
                None, Sampler, create_transport, 4, 50, args.seed, rows, device=args.device, heads={"num_heads": 4})
        worst = max(rows)
        print(f"worst relative difference {worst:.3e} (target < {TARGET:.0e}): {'PASS' if worst < TARGET else 'FAIL'}")
        sys.exit(0 if worst < TARGET else 1)
    compare("LightningDiT (DiT), tiny: C=32, 8x8, width 64, depth 2, 4 heads", LightningDiT,
            dict(input_size=8, in_channels=32, hidden_size=64, depth=2, num_heads=4, **common),
            None, Sampler, create_transport, 4, 50, args.seed, rows, device=args.device)
    compare("DiTwDDTHead (DiT^DH), tiny: C=32, 8x8, trunk 64x2 (4 heads), head 96x2 (4 heads)",
            DiTwDDTHead,
            dict(input_size=8, in_channels=32, hidden_size=[64, 96], depth=[2, 2],
                 num_heads=[4, 4], **common),
            dict(input_size=8, in_channels=32, hidden_size=[32, 96], depth=[1, 2],
                 num_heads=[2, 4], **common),
            Sampler, create_transport, 4, 50, args.seed, rows, device=args.device)
    # ImageNet 512's grid: 32 x 32 tokens (DINOv2-B at 448 px), the 512 sampling config's shift
    # sqrt(32*32*768 / 4096) = sqrt(192) and AutoGuidance scale 1.5; small widths.
    compare("DiTwDDTHead (DiT^DH), 512 grid: C=32, 32x32, trunk 64x2, head 96x2; guide trunk 32x1",
            DiTwDDTHead,
            dict(input_size=32, in_channels=32, hidden_size=[64, 96], depth=[2, 2],
                 num_heads=[4, 4], **common),
            dict(input_size=32, in_channels=32, hidden_size=[32, 96], depth=[1, 2],
                 num_heads=[2, 4], **common),
            Sampler, create_transport, 2, 50, args.seed, rows, device=args.device,
            shift=math.sqrt(786432 / 4096), ag_scale=1.5)
    if args.real:
        real = dict(input_size=16, in_channels=768, patch_size=1, mlp_ratio=4.0, num_classes=1000)
        compare("DiTwDDTHead real size: DiT^DH-S on [768, 16, 16] (guide: 1-block trunk)",
                DiTwDDTHead, dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16], **real),
                dict(hidden_size=[384, 2048], depth=[1, 2], num_heads=[6, 16], **real),
                Sampler, create_transport, 1, 50, args.seed, rows, guided_full=False,
                device=args.device)
    worst = max(rows)
    print(f"worst relative difference {worst:.3e} (target < {TARGET:.0e}): "
          f"{'PASS' if worst < TARGET else 'FAIL'}")
    sys.exit(0 if worst < TARGET else 1)


if __name__ == "__main__":
    main()
