"""The speed routes of issue 14, each measured beside the bf16 path and the reference in one call.

    python benchmarks/bench_speed_routes.py --part train  --reference /path/to/RAE
    python benchmarks/bench_speed_routes.py --part sample --reference /path/to/RAE
    python benchmarks/bench_speed_routes.py --part attention
    python benchmarks/bench_speed_routes.py --part train --smoke        # CPU, tiny: checks the script runs

train   DiT^DH-XL training step (``DiffusionTraining.train_step``, compiled, bf16 autocast, [768, 16, 16]) as it
        is, with torchao float8 training (tensorwise and rowwise recipes) on the token-wise Linear
        layers (qkv, proj, SwiGLU w12/w3, the head projector and final linear: M = batch x 256
        rows; the adaLN and embedding Linears have M = batch rows and stay bf16), and with
        torch.compile's CUDA-graph mode, with Inductor's kernel tuning (INDUCTOR_ROUTES); the reference's
        compiled loop re-run in the same call.
sample  AutoGuidance sampling (DiT^DH-XL guided by DiT^DH-S, 50 steps, compiled) + ViT-XL decode,
        bf16 as today and ``--precision fp8`` (stages.models.fp8: float8 e4m3, per-row scales, on the
        models' per-token Linears) at the first of --sample-batches, fp8 also at the others; the
        reference loop with --with-reference.
attention  SDPA forward + backward at DiT^DH-XL's shape per backend (cuDNN, flash, efficient).
casts   float8 sampling's casts (stages.models.fp8_triton's one-pass kernels against Inductor's).

Each prints a table last, naming the card.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train_diffusion as btd  # noqa: E402

from stages.models.dit import create_dit  # noqa: E402

START = time.perf_counter()


def log(what: str) -> None:
    """A timestamped progress line: a call cut off by its time limit still shows where it was."""
    print(f"[{time.perf_counter() - START:6.0f} s] {what}", flush=True)


TOKEN_LINEARS = ("qkv", "proj", "w12", "w3", "s_projector", "final_layer.linear")


def token_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The Linears applied per token (large M), with dimensions float8 kernels accept."""
    return (isinstance(module, torch.nn.Linear) and fqn.endswith(TOKEN_LINEARS)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def wide_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The per-token Linears with a side of at least 2,048: the head's, the trunk's SwiGLU (issue 29's route 4)."""
    return token_linear(module, fqn) and max(module.in_features, module.out_features) >= 2048


def to_float8_training(model: torch.nn.Module, recipe: str, only=token_linear) -> int:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    n = sum(only(m, name) for name, m in model.named_modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=only)
    return n


def use_liger(model: torch.nn.Module) -> int:
    """Liger's Triton RMSNorm and SiLU-mul (forward + backward) in place of the modules' own (same maths);
    returns how many modules were switched. RoPE stays: Liger's rotates halves, ours adjacent pairs."""
    import types as _types

    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from stages.models.dit import RMSNorm, SwiGLU

    def rms(self, x):
        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)

    def swiglu(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(LigerSiLUMulFunction.apply(a, b))

    n = 0
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward, n = _types.MethodType(rms, m), n + 1
        elif isinstance(m, SwiGLU):
            m.forward, n = _types.MethodType(swiglu, m), n + 1
    return n


# Sampling kinds with models of their own (copies made once, compiled under the default settings).
OWN_MODEL_KINDS = ("fp8-tensor", "fp8-unfused", "fp8-linears", "bf16-unaligned", "bf16-linears")


def unalign(model: torch.nn.Module) -> torch.nn.Module:
    """Every SwiGLU computed at its stored hidden width (the head's 5,461), as before ``SwiGLU.align``."""
    from stages.models.dit import SwiGLU

    for m in model.modules():
        if isinstance(m, SwiGLU):
            m.align = 1
    return model


# ---- training --------------------------------------------------------------------------------
# Routes that change only how Inductor tunes the kernels it generates (the step's elementwise quarter):
# coordinate descent over each Triton kernel's block sizes and warps, and benchmarking several configurations
# of each pointwise and reduction kernel. "inductor-gemm" autotunes the products too, between cuBLAS and
# Inductor's Triton GEMM templates, where a template can take the elementwise work after a product (bias,
# gate, residual add) into its epilogue: one pass over the product's output fewer. All cost compile time,
# not code.
INDUCTOR_ROUTES = {"inductor-cdt": {"coordinate_descent_tuning": True},
                   "inductor-pointwise": {"max_autotune_pointwise": True},
                   "inductor-cdt-pointwise": {"coordinate_descent_tuning": True, "max_autotune_pointwise": True},
                   "inductor-gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                                     "epilogue_fusion": True}}


def build_train(name, device, batch, route, precision):
    from stages.train.diffusion_step import DiffusionTraining
    from stages.train.config import TrainDiffusionConfig

    (preset, overrides), _, (C, H, _) = btd.MODELS[name]
    torch.manual_seed(0)
    model = create_dit(preset, C, H, 1000, **overrides)
    if route.startswith("fp8-"):
        to_float8_training(model, route[4:])
    elif route.startswith("fp8w-"):
        to_float8_training(model, route[5:], wide_linear)
    elif route == "liger":
        use_liger(model)
    elif route == "adaln-triton":
        from stages.models import adaln_triton

        adaln_triton.enable(model)
    elif route == "unaligned":
        unalign(model)
    cfg = TrainDiffusionConfig(latents="-", out="-", model=preset, batch_size=batch, precision=precision,
                               compile=route != "cudagraphs")
    trainer = DiffusionTraining(model, cfg, device, shift=btd._shift(C, H), null_label=1000,
                                fused_update=route == "fused-update")
    if route == "cudagraphs":
        trainer.net = torch.compile(trainer.net, mode="reduce-overhead")
    x = torch.randn(batch, C, H, H, device=device)
    labels = torch.randint(0, 1000, (batch,))
    state = {"step": 0}

    def step():
        state["step"] += 1
        if route == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        trainer.train_step(state["step"], x, labels, 2e-4)

    return step


def part_train(args, device, card):
    name = "tiny" if args.smoke else "ditdh-xl"
    precision = "fp32" if args.smoke else "bf16"
    ref = btd.import_reference(args.reference) if args.reference else None
    flops = btd.flops_per_image(name, device)
    btd.free(device)
    rows, profiles = [], {}
    plan = [(b, r) for b in args.batches for r in args.routes]
    if ref is not None:
        plan = [(args.batches[0], "reference")] + plan
    for batch, route in plan:
        log(f"train: {route}, batch {batch}")
        try:
            with torch._inductor.config.patch(INDUCTOR_ROUTES.get(route, {})):  # compiles in the warm-up
                if route == "reference":
                    step, _ = btd.build_reference(name, device, batch, precision, not args.smoke, ref)
                else:
                    step = build_train(name, device, batch, route, precision)
                seconds = btd.time_steps(step, device, args.warmup, args.iters)
                if args.profile_steps:
                    import profile_train_step

                    profiles[(route, batch)] = profile_train_step.profile(step, device, args.profile_steps)[0]
            ips = batch * args.iters / seconds
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
            rows.append((route, batch, ips, ips * flops / 1e12, peak, ""))
        except torch.OutOfMemoryError:
            rows.append((route, batch, None, None, None, "OOM"))
        except Exception as e:  # a route that does not run here is a row saying why, not the end of the call
            rows.append((route, batch, None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
        print(rows[-1], flush=True)
        step = None
        btd.free(device)
    base = {b: ips for r, b, ips, *_ in rows if r == "bf16" and ips}
    ref_ips = next((ips for r, b, ips, *_ in rows if r == "reference" and ips), None)
    print(f"\n## DiT^DH-XL training step by route, {card}, compiled, {args.iters} timed steps after {args.warmup}")
    print("| route | batch | img/s | TFLOP/s (bf16-equivalent) | peak GB | vs bf16 (same batch) | vs reference (batch "
          f"{args.batches[0]}) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for route, batch, ips, tf, peak, note in rows:
        f = (lambda v, s: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, s))
        vs_b = f(ips / base[batch], ".2f") + "x" if ips and batch in base else "-"
        vs_r = f(ips / ref_ips, ".2f") + "x" if ips and ref_ips else "-"
        print(f"| {route} | {batch} | {f(ips, ',.0f')} | {f(tf, '.0f')} | {f(peak, '.1f')} | {vs_b} | {vs_r} | {note} |")
    if profiles:  # where each route's step goes: what it changed, and what bounds it
        unit = "GPU kernel ms" if device.type == "cuda" else "CPU operator ms (smoke)"
        print_profiles(profiles, f"The same steps by kernel category ({unit} per step, {args.profile_steps} "
                       f"profiled steps), {card}")
    print(f"card: {card}")


def print_profiles(profiles: dict, title: str) -> None:
    """{(route, batch): {category: ms}} as one table, the routes side by side, the largest category first."""
    keys = list(profiles)
    cats = sorted({c for p in profiles.values() for c in p}, key=lambda c: -max(p.get(c, 0) for p in profiles.values()))
    print(f"\n## {title}")
    print("| category | " + " | ".join(f"{r} ({b})" for r, b in keys) + " |\n|---|" + "---|" * len(keys))
    for c in cats + ["total"]:
        vals = [sum(p.values()) if c == "total" else p.get(c, 0.0) for p in profiles.values()]
        print(f"| {c} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")


# ---- sampling --------------------------------------------------------------------------------
def cast_linears(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every ``nn.Linear``'s weight and bias in ``dtype``, in place (the ``-linears`` sampling kinds). Under autocast
    to that dtype autocast casts them so at every call: the same values (bit for bit on the CPU), made once
    instead of by a copy kernel per product. Not timed yet; if it pays, ``generation.ready`` is its place."""
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.to(dtype)
    return model


def part_sample(args, device, card):
    """bf16 (rae sample's default on CUDA) against ``--precision fp8`` (``stages.models.fp8``: the models'
    per-token Linears as float8 e4m3 with per-row scales), each as ``rae sample`` sets it up: fp32
    weights under bf16 autocast, the float8 layers converted before compiling."""
    import copy

    import bench_sample as bs

    from stages import flow
    from stages.models.decoder import to_uint8
    from stages.models import fp8
    from stages.models.decoder import ViTDecoder, create_decoder
    if device.type == "cuda":
        from stages.models import fp8_triton

    torch._dynamo.config.automatic_dynamic_shapes = False  # another batch size: a static recompile
    # Four models share DiTDH.forward's code object, each compiled for plain and inference-mode inputs.
    torch._dynamo.config.recompile_limit = 64
    smoke = args.smoke
    C, H, classes = (32, 4, 10) if smoke else (768, 16, 1000)
    common = dict(input_size=H, in_channels=C, patch_size=1, mlp_ratio=4.0, num_classes=classes)
    shift = math.sqrt(48)
    DiTwDDTHead, Sampler, create_transport, _ = bs.import_reference(args.reference, [])
    ref_xl, xl = bs.build_pair(DiTwDDTHead, bs.TINY_XL if smoke else bs.XL, common, 0)
    ref_s, s = bs.build_pair(DiTwDDTHead, bs.TINY_S if smoke else bs.S, common, 1)
    decoder = (ViTDecoder(C, H, 4, 32, 1, 2, 64) if smoke else create_decoder("vit-xl", C, H, 16)).eval()
    for m in (ref_xl, xl, ref_s, s, decoder):
        m.to(device).requires_grad_(False)
    log("sample: models built")
    ref_fn = Sampler(create_transport("Linear", "velocity", time_dist_shift=shift)).sample_ode(
        sampling_method="euler", num_steps=50)
    compile_ = (lambda f: f) if smoke else torch.compile
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=True)
    scale = 1.42
    models = {"bf16": (xl, s)}
    own = [k for k in args.sample_kinds if k in OWN_MODEL_KINDS]
    for kind in ["fp8"] + own:
        if kind.startswith("fp8"):
            scaling = "tensor" if kind == "fp8-tensor" else "row"
            models[kind] = tuple(fp8.to_float8(copy.deepcopy(m), m.per_token_linears(), scaling) for m in (xl, s))
            if kind in ("fp8", "fp8-linears"):  # the casts fused on CUDA; fp8-unfused: Inductor's casts
                for m in models[kind] if device.type == "cuda" else ():
                    fp8_triton.enable(m)
        elif kind == "bf16-unaligned":
            models[kind] = tuple(unalign(copy.deepcopy(m)) for m in (xl, s))
        else:  # bf16-linears: the Linears' weights held in bf16
            models[kind] = tuple(copy.deepcopy(m) for m in (xl, s))
        if kind.endswith("-linears"):
            models[kind] = tuple(cast_linears(m, torch.bfloat16) for m in models[kind])
    log(f"sample: float8 copies made ({len(xl.per_token_linears())} + {len(s.per_token_linears())} layers)")
    models.update({k: models[k.split("-", 1)[0]] for k in args.sample_kinds if k not in models})  # the tuned kinds
    models = {k: (compile_(a), compile_(b)) for k, (a, b) in models.items()}

    def ours(kind):
        m_xl, m_s = models[kind]

        def generate(b, z=None, yb=None):
            z = torch.randn(b, C, H, H, device=device) if z is None else z
            yb = torch.randint(0, classes, (b,), device=device) if yb is None else yb
            v = flow.guided_velocity(m_xl, yb, "autoguidance", scale, guide_model=m_s)
            with torch.autocast(**autocast):
                x = flow.sample(v, z, 49, shift, "euler-ref")
                return x, to_uint8(decoder(x))
        return generate

    ref_xl_fwd, ref_s_fwd = compile_(ref_xl.forward), compile_(ref_s.forward)

    def reference(b):
        z = torch.randn(b, C, H, H, device=device)
        yb = torch.randint(0, classes, (b,), device=device)
        with torch.autocast(**autocast):
            original = ref_xl.forward
            ref_xl.forward = ref_xl_fwd
            try:
                x = ref_fn(torch.cat([z, z]), ref_xl.forward_with_autoguidance,
                           y=torch.cat([yb, torch.full_like(yb, classes)]), cfg_scale=scale,
                           additional_model_forward=ref_s_fwd, cfg_interval=(0.0, 1.0))[-1].chunk(2)[0]
            finally:
                ref_xl.forward = original
            return to_uint8(decoder(x))

    # The first batch of each kind, from fixed noise and labels, compiles and gives the bf16 vs fp8
    # comparison; then the timed ones.
    b0 = 2 if smoke else args.sample_batches[0]
    n = 4 if smoke else args.n
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(b0, C, H, H, generator=gen).to(device)
    yb = torch.randint(0, classes, (b0,), generator=gen).to(device)
    plan = (["reference"] if args.with_reference else []) + ["bf16", "fp8"] + own  # own models: no reset
    plan = [(k, b0) for k in plan] + [("fp8", b) for b in ([] if smoke else args.sample_batches[1:])]
    # The Inductor-tuned kinds last: each starts from a reset compiler cache, so it compiles under its own
    # settings (the kinds before it are not called again).
    plan += [(k, b0) for k in args.sample_kinds if k not in ("bf16", "fp8") and k not in OWN_MODEL_KINDS]
    rows, first, profiles = [], {}, {}
    for kind, b in plan:
        log(f"sample: {kind}, batch {b} (its first batch compiles)")
        try:
            if kind == "reference":
                ips = bs.time_loop(reference, n, b, device)
            else:
                tuning = kind.split("-", 1)[1] if "-" in kind else None
                if kind not in first:
                    if tuning in INDUCTOR_ROUTES or kind in OWN_MODEL_KINDS:  # a compile of its own
                        torch._dynamo.reset()
                    with torch.inference_mode(), torch._inductor.config.patch(INDUCTOR_ROUTES.get(tuning, {})):
                        first[kind] = ours(kind)(b, z, yb)
                with torch.inference_mode():
                    ips = bs.time_loop(lambda bb: ours(kind)(bb)[1], n, b, device)
                    if b == b0 and args.profile_steps:  # one batch (50 steps + decode) by kernel category
                        import profile_train_step

                        profiles[kind] = profile_train_step.profile(lambda: ours(kind)(b), device, 1)
            note = ""
        except Exception as e:
            ips, note = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append((kind, b, ips, note))
        print(rows[-1], flush=True)
    def drift(kind, base):  # kind's first batch against base's, same noise and labels: sample rel. L2, uint8 max, mean
        (x_k, img_k), (x_b, img_b) = first[kind], first[base]
        diff = abs(img_k.astype(int) - img_b.astype(int))
        return ((x_k.float() - x_b.float()).norm() / x_b.float().norm()).item(), int(diff.max()), float(diff.mean())

    drifts = {kind: drift(kind, "bf16") for kind in first if kind != "bf16" and "bf16" in first}
    if "fp8" in first and "fp8-unfused" in first:  # the fused casts against Inductor's
        drifts["fp8 vs fp8-unfused"] = drift("fp8", "fp8-unfused")
    base = next((ips for k, b, ips, _ in rows if k == "bf16" and ips), None)
    print(f"\n## AutoGuidance sampling (DiT^DH-XL + DiT^DH-S, 50 points) + ViT-XL decode + uint8, {card}, "
          f"models compiled, {n} images per row after a compiling batch")
    print("| configuration | batch | img/s | FID-50K time | vs ours bf16 | note |")
    print("|---|---|---|---|---|---|")
    for kind, bb, ips, note in rows:
        if ips:
            vs = f"{ips / base:.2f}x" if base else "-"
            print(f"| {kind} | {bb} | {ips:.2f} | {50000 / ips / 60:.1f} min | {vs} | {note} |")
        else:
            print(f"| {kind} | {bb} | - | - | - | {note} |")
    for kind, (drift, pix, mean_pix) in drifts.items():
        vs = "" if " vs " in kind else " vs bf16"
        print(f"| {kind}{vs}, same noise and labels (random weights): sample relative L2 | | {drift:.2e} | | | "
              f"uint8 max {pix}, mean {mean_pix:.2f} |")
    if profiles:
        unit = "GPU kernel ms" if device.type == "cuda" else "CPU operator ms (smoke)"
        print_profiles({(k, b0): p[0] for k, p in profiles.items()},
                       f"One batch of {b0} (50 points of both models + decode) by kernel category ({unit}), {card}")
        for kind, (_, kernels) in profiles.items():
            print(f"\n## {kind}: the 12 longest kernels of that batch ({unit})\n| kernel | ms | share |\n|---|---|---|")
            total = sum(kernels.values())
            for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
                print(f"| {name[:90]} | {ms:.1f} | {ms / total:.0%} |")
    print(f"card: {card}")


# ---- the update after the backward pass (issue 29, route 2) ------------------------------------------
def part_optimizer(args, device, card):
    """Clip + AdamW + EMA over DiT^DH-XL's parameters (fp32, random gradients), per update: today's three
    passes, the compiled one pass (``ParameterUpdate(fused=True)``), and the same maths over one flat buffer of all parameters
    (one kernel: what a single pass can reach), beside the bytes each must move at the card's copy rate."""
    from stages.train.fused_update import ParameterUpdate, adamw_ema_

    (preset, overrides), _, (C, H, _) = btd.MODELS["tiny" if args.smoke else "ditdh-xl"]
    model = create_dit(preset, C, H, 1000, **overrides).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def setup(fused):
        torch.manual_seed(1)
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        emas = [p.detach().clone() for p in ps]
        opt = torch.optim.AdamW(ps, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
        return ps, emas, ParameterUpdate(opt, emas, 1.0, 0.9995, fused=fused, compiled=fused and not args.smoke)

    def timed(update, iters):  # ms per update
        return btd.time_steps(lambda: update(2e-4), device, 3, iters) / iters * 1e3

    iters = 2 if args.smoke else 30
    rows = []
    log("optimizer: today's three passes")
    a_ps, a_emas, today = setup(False)
    rows.append(("today: clip_grad_norm_ + fused AdamW + foreach EMA lerp", timed(today, iters), 13))
    del today
    log("optimizer: the fused update (compiles)")
    b_ps, b_emas, fused = setup(True)
    rows.append(("fused: grad norm, then one compiled foreach pass", timed(fused, iters), 10))
    # Same start, same number of updates: how far apart the two paths end.
    drift = max(((p - q).norm() / q.norm()).item() for p, q in zip(a_ps, b_ps))
    drift_ema = max(((p - q).norm() / q.norm()).item() for p, q in zip(a_emas, b_emas))
    del fused, a_ps, a_emas, b_ps, b_emas
    btd.free(device)
    log("optimizer: one flat buffer")
    flat = [torch.randn(n, device=device) * s for s in (1e-2, 1e-3, 1e-4, 1e-6, 1e-2)]  # p, g, m, v, ema
    step = [torch.zeros((), device=device)]
    lr = torch.full((), 2e-4, dtype=torch.float64, device=device)
    one = (lambda f: f) if args.smoke else (lambda f: torch.compile(f, fullgraph=True, dynamic=False))
    flat_fn = one(adamw_ema_)

    def flat_update(_lr):
        with torch.no_grad():
            norm = torch.linalg.vector_norm(flat[1])
            flat_fn([flat[0]], [flat[1]], [flat[2]], [flat[3]], step, [flat[4]], lr, norm, 1.0, 0.9, 0.95, 1e-8,
                    0.0, 5e-4)
    rows.append(("floor: the same maths over one flat buffer (1 kernel + the norm)", timed(flat_update, iters), 10))
    src, dst = flat[0], flat[1]
    copy_ms = timed(lambda _lr: dst.copy_(src), iters)
    gbps = 2 * n * 4 / copy_ms / 1e6
    flat.clear()
    src = dst = None  # noqa: F841 (frees the buffers before the table)
    btd.free(device)
    print(f"\n## The update after the backward pass, {preset}'s {n / 1e6:.1f}M trainable fp32 parameters, {card}")
    print(f"(copy rate measured here: {gbps:,.0f} GB/s; passes = full reads + writes of one fp32 copy of the "
          "parameters)")
    print("| update | ms | passes | ms at the copy rate |\n|---|---|---|---|")
    for name, ms, passes in rows:
        print(f"| {name} | {ms:.2f} | {passes} | {passes * n * 4 / gbps / 1e6:.2f} |")
    print(f"| fused against today after {iters + 3} updates from one start: parameters / EMA, max relative L2 "
          f"| {drift:.1e} / {drift_ema:.1e} | | |")
    print(f"card: {card}")


def kernel_ms(step, iters: int, device) -> float | None:
    """Milliseconds per ``step`` that the GPU spends inside kernels (profile_train_step's profile, summed over
    its categories): the host's share (Python, autograd, launches) left out. None off the GPU."""
    if device.type != "cuda":
        return None
    import profile_train_step

    step()
    return sum(profile_train_step.profile(step, device, iters)[0].values())


# ---- the block's elementwise chains (issue 29, route 1) ---------------------------------------------
def part_kernels(args, device, card):
    """Forward + backward of the trunk block's elementwise chains at DiT^DH-XL's shape (batch x 256 tokens,
    width 1,152, SwiGLU hidden 3,072, 16 heads of 72), bf16: Inductor's fused kernels (our modules
    compiled) against Liger's Triton kernels (RMSNorm; SiLU-mul; RoPE in its rotate-halves layout,
    the same work) and rae's own RMSNorm + modulation kernel (stages.models.adaln_triton)."""
    from stages.models.dit import RMSNorm, RoPE2D, apply_rope, modulate

    b, n, d, hidden, heads = (2, 16, 64, 96, 4) if args.smoke else (args.batches[0], 256, 1152, 3072, 16)
    hd = d // heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    norm = RMSNorm(d).to(device)
    rope = RoPE2D(hd, int(math.isqrt(n))).to(device)
    cos, sin = rope.freqs_cos, rope.freqs_sin
    compile_ = (lambda f: f) if args.smoke else torch.compile

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    x, shift, scale = rand(b, n, d), rand(b, 1, d), rand(b, 1, d)
    ab = rand(b, n, 2 * hidden)
    q = rand(b, heads, n, hd)
    k = rand(b, heads, n, hd)
    def silu_mul():
        a_, b_ = ab.chunk(2, -1)
        return torch.nn.functional.silu(a_) * b_

    chains = {
        "RMSNorm + adaLN modulate": compile_(lambda: modulate(norm(x), shift, scale)),
        "SiLU(a) * b": compile_(silu_mul),
        "RoPE on q and k": compile_(lambda: apply_rope(q, cos, sin) + apply_rope(k, cos, sin)),
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        half_cos, half_sin = cos[None].to(dtype), sin[None].to(dtype)
        chains["Liger RMSNorm + modulate (Inductor)"] = compile_(lambda: modulate(
            LigerRMSNormFunction.apply(x, norm.weight, 1e-6, 0.0, "llama", False), shift, scale))
        chains["Liger SiLU-mul"] = lambda: LigerSiLUMulFunction.apply(*ab.chunk(2, -1))

        def liger_rope():
            qr, kr = LigerRopeFunction.apply(q, k, half_cos, half_sin)
            return qr + kr
        chains["Liger RoPE (halves layout)"] = liger_rope
        liger = ""
    except ImportError as e:
        liger = f"liger-kernel not installed ({e})"
    if device.type == "cuda":  # the hand-written kernel (Triton needs the GPU here)
        from stages.models import adaln_triton

        chains["rae Triton RMSNorm + modulate (adaln_triton)"] = (
            lambda: adaln_triton.norm_modulate(x, norm.weight, shift, scale, norm.eps))
    rows = []
    iters = 2 if args.smoke else 20
    leaves = (x, shift, scale, ab, q, k)
    for name, fn in chains.items():
        try:
            grad = torch.ones_like(fn())  # made once: the steps time the chain, not a fill

            def step():
                fn().backward(grad)
                for t in leaves:  # no accumulation into last step's gradients
                    t.grad = None
            wall = btd.time_steps(step, device, 3, iters) / iters * 1e3
            rows.append((name, wall, kernel_ms(step, iters, device), ""))
        except Exception as e:
            rows.append((name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
        for t in leaves:
            t.grad = None
    print(f"\n## Elementwise chains of one trunk block, forward + backward, [{b} x {n}, {d}] {dtype}, {card}")
    print("(wall: the step's time, host included; kernels: the time the GPU spends in kernels, from the profiler. "
          "Where wall is well above kernels, the host (autograd, launches) bounds the step and wall ranks nothing.)")
    print("| chain | wall ms per block | kernels ms per block | kernels x 28 blocks | note |\n|---|---|---|---|---|")
    for name, ms, kms, note in rows:
        if ms is None:
            print(f"| {name} | - | - | - | {note} |")
        else:
            k_text = (f"{kms:.3f} | {kms * 28:.1f}") if kms is not None else "- | -"
            print(f"| {name} | {ms:.3f} | {k_text} | {note} |")
    if liger:
        print(f"| Liger | - | - | - | {liger} |")
    print(f"card: {card}")


# ---- the SwiGLU products at an aligned and an unaligned hidden width (issue 29) -------------------------
def part_gemm(args, device, card):
    """The products of one SwiGLU MLP (w12: D -> 2H, w3: H -> D), forward and forward + backward, bf16, at
    M = batch x 256 tokens: the wide head's H = 5,461 (each bf16 row 10,922 bytes, not a multiple of 16, so
    Hopper's tensor-copy engine cannot load it) against the same product zero-padded to 5,464, 5,472 and
    5,504 (what ``SwiGLU.align`` computes), and the trunk's aligned 3,072 for scale. TFLOP/s counts the
    unpadded H: the useful work."""
    m = 64 if args.smoke else args.batches[0] * 256
    shapes = [(32, 40), (32, 48)] if args.smoke else [(2048, 5461), (2048, 5464), (2048, 5472), (2048, 5504),
                                                      (1152, 3072)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for d, h in shapes:
        x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
        w12 = torch.randn(2 * h, d, device=device, dtype=dtype, requires_grad=True)
        w3 = torch.randn(d, h, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(m, d, device=device, dtype=dtype)
        ab = torch.randn(m, 2 * h, device=device, dtype=dtype)

        def forward():
            return torch.nn.functional.linear(ab[:, :h], w3), torch.nn.functional.linear(x, w12)

        def both():
            y = torch.nn.functional.linear(ab[:, :h].detach().requires_grad_(), w3)
            y.backward(g)
            torch.nn.functional.linear(x, w12).backward(ab)
            x.grad = w12.grad = w3.grad = None
        iters = 2 if args.smoke else 20
        stored = min(hh for dd, hh in shapes if dd == d)  # the width a padded row stands for
        flop = 2 * m * d * 3 * stored  # w12 (2H outputs) + w3 (H inputs)
        per = {}
        with torch.no_grad():
            per["forward"] = btd.time_steps(forward, device, 3, iters) / iters
        per["forward + backward"] = btd.time_steps(both, device, 3, iters) / iters
        rows.append((d, h, per["forward"] * 1e3, flop / per["forward"] / 1e12,
                     per["forward + backward"] * 1e3, 3 * flop / per["forward + backward"] / 1e12))
        btd.free(device)
    print(f"\n## One SwiGLU MLP's products (w12 + w3), M = {m} rows, {dtype}, {card}")
    print("| D | H computed | forward ms | forward TFLOP/s (useful) | fwd + bwd ms | fwd + bwd TFLOP/s (useful) |")
    print("|---|---|---|---|---|---|")
    for d, h, f_ms, f_tf, b_ms, b_tf in rows:
        print(f"| {d} | {h} | {f_ms:.3f} | {f_tf:.0f} | {b_ms:.3f} | {b_tf:.0f} |")
    print(f"card: {card}")


# ---- float8 sampling's casts (issue 29, route 3) ---------------------------------------------------
def part_casts(args, device, card):
    """Float8 sampling's casts at DiT^DH-XL's and -S's shapes (M = batch x 256 rows): ``stages.models.fp8_triton``'s
    one-pass kernels against the same maths compiled by Inductor (what ``--precision fp8`` ran before), in GPU
    ms per call and GB/s of the bytes each must move (its inputs read once, the float8 rows written), and the
    share of float8 bytes equal to eager ``fp8.quantize``'s; with ``--sweep`` each kernel's launch
    configurations (rows per program, warps) too. Off CUDA (``--smoke``) it needs ``TRITON_INTERPRET=1``."""
    from stages.models import fp8, fp8_triton
    from stages.models.dit import RMSNorm, modulate

    F = torch.nn.functional
    b, t = (2, 4) if args.smoke else (args.batches[0], 256)
    compile_ = (lambda f: f) if args.smoke else torch.compile
    bf16 = torch.bfloat16

    def norm_case(name, d, x_dtype, per_token):
        norm = RMSNorm(d).to(device)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.1)
        x = torch.randn(b, t, d, device=device).to(x_dtype)
        shift, scale = torch.randn(b, t if per_token else 1, 6 * d, device=device, dtype=bf16)[..., :2 * d].chunk(2, -1)
        width = fp8._ceil(d)
        fused = lambda: fp8_triton.norm_modulate_float8(x, norm.weight, shift, scale, norm.eps, width)  # noqa: E731
        maths = lambda: fp8.quantize(F.pad(modulate(norm(x), shift, scale).reshape(-1, d), (0, width - d)), "row")  # noqa: E731
        q, s, _ = fused()
        launch = lambda config: fp8_triton._norm_modulate_rows(x, norm.weight, shift, scale, norm.eps, q, s, config)  # noqa: E731
        moved = x.numel() * x.element_size() + 2 * shift.numel() * 2 + b * t * (width + 4)
        return name, width, fused, compile_(maths), maths, launch, moved

    def gate_case(name, h, aligned=False):
        # as the float8 w12 hands it on: its padded output's first 2H columns, or (aligned) [a, 0, b, 0]
        wide = torch.randn(b * t, 2 * fp8._ceil(h) if aligned else fp8._ceil(2 * h), device=device, dtype=bf16) * 2
        h12 = wide if aligned else wide[:, :2 * h]
        width = fp8._ceil(h)
        fused = lambda: fp8_triton.swiglu_float8(h12, width)  # noqa: E731

        def maths():
            a, g = h12.chunk(2, -1)
            return fp8.quantize(F.pad(F.silu(a) * g, (0, width - a.shape[-1])), "row")
        q, s, _ = fused()
        launch = lambda config: fp8_triton._swiglu_rows(h12, q, s, config)  # noqa: E731
        return name, width, fused, compile_(maths), maths, launch, h12.numel() * 2 + b * t * (width + 4)

    xl, sm, head, h_xl, h_s, h_head = (32, 16, 48, 40, 24, 85) if args.smoke else (1152, 384, 2048, 3072, 1024, 5461)
    cases = [norm_case(f"XL trunk RMSNorm + modulate + cast, D {xl}, x float32", xl, torch.float32, False),
             norm_case(f"S trunk RMSNorm + modulate + cast, D {sm}, x float32", sm, torch.float32, False),
             norm_case(f"head RMSNorm + modulate (per token) + cast, D {head}, x bf16", head, bf16, True),
             gate_case(f"XL trunk SiLU gate + cast, H {h_xl}", h_xl), gate_case(f"S trunk SiLU gate + cast, H {h_s}", h_s),
             gate_case(f"head SiLU gate + cast, H {h_head} -> pad 16", h_head),
             gate_case(f"head SiLU gate + cast, H {h_head}, halves aligned (as switched)", h_head, aligned=True)]
    iters = 2 if args.smoke else 50
    rows, sweep = [], []
    for name, width, fused, inductor, eager, launch, moved in cases:
        with torch.no_grad():
            q_ref, s_ref = eager()
            got = fused()
            q_ind, _ = inductor()
            same = (got.q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
            same_ind = (q_ind.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
            scale_err = ((got.scale - s_ref).abs() / s_ref).max().item()
            ms = {k: btd.time_steps(f, device, 3, iters) / iters * 1e3 for k, f in (("fused", fused), ("inductor", inductor))}
            block = fp8_triton._config(width)["BLOCK"]
            for rows_per in (1, 2, 4, 8, 16, 32) if args.sweep else ():
                for warps in (4, 8, 16):
                    if rows_per * block > 32768 or (rows_per * block) // (32 * warps) < 4 or (args.smoke and warps > 4):
                        continue
                    config = dict(BLOCK=block, ROWS=rows_per, num_warps=warps)
                    sweep.append((name, rows_per, warps, btd.time_steps(lambda: launch(config), device, 3, iters)
                                  / iters * 1e3, moved, config == fp8_triton._config(width)))
        rows.append((name, ms["inductor"], ms["fused"], moved, same, same_ind, scale_err))
        log(f"casts: {name} done")
    if sweep:
        print(f"\n## Launch configurations swept, M = {b * t} rows, {card} (* = the kernel's choice)")
        print("| cast | rows per program | warps | ms | GB/s |\n|---|---|---|---|---|")
    for name, rows_per, warps, ms, moved, chosen in sweep:
        print(f"| {name} | {rows_per} | {warps} | {ms:.4f}{' *' if chosen else ''} | {moved / ms / 1e6:.0f} |")
    print(f"\n## Float8 sampling's casts, M = {b * t} rows, {card} (GPU ms per call; GB/s of the bytes each must move)")
    print("| cast | Inductor ms | GB/s | one-pass kernel ms | GB/s | speed-up | bytes as eager quantize: kernel / Inductor | "
          "scale rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ind, fus, moved, same, same_ind, scale_err in rows:
        print(f"| {name} | {ind:.3f} | {moved / ind / 1e6:.0f} | {fus:.3f} | {moved / fus / 1e6:.0f} | {ind / fus:.2f}x | "
              f"{same:.4%} / {same_ind:.4%} | {scale_err:.1e} |")
    print(f"card: {card}")


# ---- attention -------------------------------------------------------------------------------
def part_attention(args, device, card):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, heads, tokens, dim = (64, 16, 256, 72) if not args.smoke else (2, 2, 16, 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    rows = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                def step():
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    out.sum().backward()
                ms = btd.time_steps(step, device, 5, 50) / 50 * 1e3
            rows.append((backend.name, ms, ""))
        except Exception as e:
            rows.append((backend.name, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
    print(f"\n## SDPA forward + backward, [{b}, {heads}, {tokens}, {dim}] bf16 (one DiT^DH-XL trunk block), {card}")
    print("| backend | ms | x 28 blocks | note |\n|---|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.3f} | {ms * 28:.1f} | {note} |" if ms else f"| {name} | - | - | {note} |")
    print(f"card: {card}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["train", "sample", "attention", "optimizer", "kernels", "gemm", "casts"],
                    required=True)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--routes", default="bf16,fp8-tensorwise,fp8-rowwise,cudagraphs",
                    help="training routes: bf16, fp8-tensorwise, fp8-rowwise, fp8-rowwise_with_gw_hp, cudagraphs, "
                    "fp8w-RECIPE (float8 on the Linears of a side >= 2048 only), liger, adaln-triton (the trunk's "
                    "RMSNorm + modulation as stages.models.adaln_triton's kernels), fused-update, unaligned (SwiGLUs at the stored hidden width), "
                    + ", ".join(INDUCTOR_ROUTES))
    ap.add_argument("--batches", default="64", help="training batch sizes")
    ap.add_argument("--profile-steps", type=int, default=3,
                    help="train: steps of each route profiled after its timing, for a table by kernel category (0: none)")
    ap.add_argument("--sample-batches", default="128,256")
    ap.add_argument("--sample-kinds", default="bf16,fp8",
                    help="sampling: bf16 and fp8 always; also fp8-tensor (per-tensor scales), fp8-unfused (the casts as "
                    "Inductor's kernels, not fp8_triton's), bf16-linears and fp8-linears (the other Linears' weights "
                    "held in bf16, cast_linears), bf16-unaligned (the "
                    "SwiGLUs at their stored width), bf16-TUNING or fp8-TUNING, TUNING one of " + ", ".join(INDUCTOR_ROUTES))
    ap.add_argument("--with-reference", action="store_true", help="sampling: also time the reference loop")
    ap.add_argument("--n", type=int, default=512, help="images timed per sampling row")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--sweep", action="store_true", help="casts: also sweep each kernel's launch configurations")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    args.routes = args.routes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sample_batches = [int(b) for b in args.sample_batches.split(",")]
    args.sample_kinds = args.sample_kinds.split(",")
    unknown = (set(args.sample_kinds) - {f"{k}-{t}" for k in ("bf16", "fp8") for t in INDUCTOR_ROUTES}
               - {"bf16", "fp8", *OWN_MODEL_KINDS})
    if unknown:
        raise SystemExit(f"--sample-kinds: unknown {', '.join(sorted(unknown))}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.smoke:
        args.routes = [r for r in args.routes if not r.startswith("fp8")
                       and r not in ("cudagraphs", "liger", "adaln-triton")] or ["bf16"]
        args.batches, args.warmup, args.iters = [2], 1, 2
    {"train": part_train, "sample": part_sample, "attention": part_attention, "optimizer": part_optimizer,
     "kernels": part_kernels, "gemm": part_gemm, "casts": part_casts}[args.part](args, device, card)


if __name__ == "__main__":
    main()
