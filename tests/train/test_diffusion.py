import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stages.artifacts.checkpoint import checkpoints, load_state, load_weights
from stages import flow
from stages.train.data import BatchPlan
from stages.encode import EncodeConfig
from stages.encode import run as encode
from stages.errors import ArtifactError, RaeError
from stages.artifacts.manifest import new_manifest, read_manifest, write_manifest
from stages.artifacts.runs import denormalize, load_diffusion_run
from stages.artifacts.store import LatentStore, Moments
from stages.train.diffusion_step import learning_rate, step_draws
from stages.train.config import TrainDiffusionConfig
from stages.train.diffusion import run
from stages.digests import sha256_file
from tests.helpers import run_rae

# A tiny DiT^DH: trunk 32 wide, head 96 wide (= the demo encoder's token dimension).
TINY = dict(model="ditdh-s", width=32, depth=2, num_heads=2, head_width=96, head_depth=1, head_num_heads=4)


def _cfg(store, out, **kw):
    base = dict(**TINY, batch_size=16, steps=8, lr=1e-3, final_lr=1e-4, warmup_steps=0, decay_end_step=8,
                ema_decay=0.9, log_every=2, checkpoint_every=4, sample_every=4, num_samples=3, sample_steps=4,
                num_workers=0, device="cpu")
    base.update(kw)
    return TrainDiffusionConfig(latents=str(store), out=str(out), **base)


def _cli_args(cfg: TrainDiffusionConfig) -> list[str]:
    args = ["train-diffusion", "--latents", cfg.latents, "--out", cfg.out]
    for k in ("model", "width", "depth", "num_heads", "head_width", "head_depth", "head_num_heads", "batch_size", "steps",
              "lr", "final_lr", "warmup_steps", "decay_end_step", "ema_decay", "log_every", "checkpoint_every",
              "sample_every", "num_samples", "sample_steps", "num_workers", "device", "grad_accum", "seed"):
        args += [f"--{k.replace('_', '-')}", getattr(cfg, k)]
    return args


@pytest.fixture(scope="module")
def store(demo_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_diffusion") / "s.zarr"
    encode(EncodeConfig(data=str(demo_images), out=str(out), encoder="dinov2-demo", random_init=True, image_size=64,
                        flip=True, block_size=16, shard_size=8, num_workers=0, device="cpu"))
    return out


def _write_store(path, latents: np.ndarray, labels: np.ndarray, complete: bool = True):
    """A latent store with given latents (NaNs allowed: the statistics ignore them), like encode's."""
    n, shape = len(latents), latents.shape[1:]
    names = [f"c{i}" for i in range(int(labels.max()) + 1)]
    attrs = {"encoder": {"name": "synthetic", "latent_shape": list(shape)}, "image_size": 16, "class_names": names,
             "num_classes": len(names)}
    s = LatentStore.create(path, n, shape, "float16", labels, np.arange(n), np.zeros(n, bool), attrs,
                           shard_size=8, block_size=16)
    ok = np.ones(n, bool)
    for b in range(s.num_blocks):
        r = s.block_range(b)
        part = latents[r.start: r.stop]
        s.write_block(b, part, ok[r.start: r.stop], moments=Moments.of_shards(np.nan_to_num(part).astype(np.float16), ok[r.start: r.stop], 8))
    manifest = new_manifest("latent-store", {"synthetic": True}, encoder=attrs["encoder"], latent_shape=list(shape),
                            num_entries=n, class_names=names, content_id=f"synthetic-{n}")
    if complete:
        s.finalize_statistics()
        s.mark_complete()
        manifest["complete"] = True
    write_manifest(path, manifest)


def _weights(run_dir, name="model_ema.safetensors"):
    return load_weights(run_dir / name)


def test_learning_rate_is_held_then_decays_linearly_to_final():
    lrs = [learning_rate(s, 2e-4, 2e-5, warmup=10, decay_end=30) for s in range(40)]
    assert lrs[:10] == [2e-4] * 10  # the released config holds the rate during "warm-up"
    assert lrs[20] == pytest.approx(1.1e-4) and lrs[30:] == [2e-5] * 10
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    ramp = [learning_rate(s, 2e-4, 2e-5, warmup=10, decay_end=30, warmup_from_zero=True) for s in range(10)]
    assert ramp[0] == pytest.approx(2e-5) and ramp[9] == pytest.approx(2e-4)


def test_step_draws_do_not_depend_on_how_the_batch_is_split():
    cfg = TrainDiffusionConfig(latents="", out="", seed=7, batch_size=32, label_dropout=0.5)
    whole = step_draws(cfg, 11, 3.0, 0, 32)
    parts = [step_draws(cfg, 11, 3.0, lo, lo + 8) for lo in range(0, 32, 8)]
    for name in ("t", "drop", "noise_seeds"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), rtol=0, atol=0)
    other = step_draws(cfg, 12, 3.0, 0, 32)
    assert not torch.equal(other.t, whole.t) and not torch.equal(other.noise_seeds, whole.noise_seeds)


def test_step_draws_drop_labels_at_the_configured_rate():
    drop = step_draws(TrainDiffusionConfig(latents="", out="", batch_size=20000, label_dropout=0.1), 0, 1.0, 0, 20000).drop
    # Seeded uniform draws (bit-identical on every CPU); the binomial standard error
    # sqrt(0.1 * 0.9 / 20000) = 0.0021 puts 0.01 at 4.7 standard errors.
    assert abs(drop.float().mean().item() - 0.1) < 0.01


def test_training_lowers_the_loss_and_writes_the_run_contract(store, tmp_path):
    out = tmp_path / "run"
    result = run(_cfg(store, out, steps=80, decay_end_step=80, log_every=10, checkpoint_every=40, sample_every=40))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 81, 10))
    assert set(records[0]) >= {"step", "epoch", "loss", "grad_norm", "lr", "img_per_s"}
    assert records[-1]["loss"] < 0.75 * records[0]["loss"]
    assert result["step"] == 80 and result["final_loss"] == records[-1]["loss"]

    manifest = read_manifest(out, kind="diffusion-run")
    assert manifest["complete"] and manifest["step"] == 80 and manifest["latent_shape"] == [96, 4, 4]
    assert manifest["num_classes"] == 10 and len(manifest["class_names"]) == 10
    assert manifest["config"]["lr"] == 1e-3 and manifest["encoder"]["name"] == "dinov2-demo"
    assert manifest["inputs"]["latents"]["content_id"] == read_manifest(store)["content_id"]
    assert manifest["content_id"] == sha256_file(out / "model_ema.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["class"] == "DiTDH" and config["model"]["kwargs"]["head_width"] == 96
    assert config["null_label"] == 10 and config["eps"] == 1e-5
    assert config["flow"]["shift"] == pytest.approx((96 * 16 / 4096) ** 0.5)
    # The store's exact statistics, copied bit for bit.
    stats = load_weights(out / "latent_stats.safetensors")
    mean, var = LatentStore(store).statistics()
    assert torch.equal(stats["mean"], torch.from_numpy(mean)) and torch.equal(stats["var"], torch.from_numpy(var))
    assert set(_weights(out)) == set(_weights(out, "model.safetensors"))
    assert load_state(checkpoints(out)[0])["step"] == 80
    assert Image.open(out / "loss.png").size == (720, 420)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["step_00000040.safetensors", "step_00000080.safetensors"]
    s = load_weights(out / "samples" / samples[-1])
    assert s["latents"].shape == (3, 96, 4, 4) and s["labels"].tolist() == [0, 1, 2] and s["latents"].isfinite().all()
    # Raw encoder space, from fixed noise seeds: the EMA model's Euler sample, denormalised.
    loaded = load_diffusion_run(out)
    noise = torch.stack([torch.randn(96, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    with torch.no_grad():
        x = flow.sample(flow.guided_velocity(loaded.model, s["labels"]), noise, steps=4, shift=loaded.shift)
    # The same functions on the same batch of 3: the same kernels, the same bits.
    assert torch.equal(s["latents"], denormalize(x, loaded.mean, loaded.var))


def test_load_diffusion_run_rebuilds_the_same_model(store, tmp_path):
    out = tmp_path / "run"
    run(_cfg(store, out, steps=4, decay_end_step=4))
    loaded = load_diffusion_run(out)
    model = loaded.model
    assert type(model).__name__ == "DiTDH" and not model.training
    ema = _weights(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    raw = load_diffusion_run(out, ema=False).model
    assert not all(torch.equal(raw.state_dict()[k], v) for k, v in ema.items())
    assert loaded.latent_shape == [96, 4, 4] and loaded.null_label == 10 and loaded.mean.shape == (96, 4, 4)
    x, t, y = torch.randn(2, 96, 4, 4), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 96, 4, 4)


def test_resume_after_interruption_equals_uninterrupted_training(store, tmp_path, capsys):
    full = tmp_path / "full"
    cfg = _cfg(store, full, steps=6, decay_end_step=6, checkpoint_every=2, keep_checkpoints=3, log_every=1)
    run(cfg)
    # The same run killed after its step-4 checkpoint: finals not written, manifest not complete, the
    # metrics log torn in the middle of a line; and the newest checkpoint file unreadable (a disk error):
    # the run resumes from the one before it, and says so.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    newest = cut / "checkpoints" / "step_00000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    for name in ("model.safetensors", "model_ema.safetensors"):
        (cut / name).unlink()
    manifest = read_manifest(cut, require_complete=False)
    manifest["complete"] = False
    write_manifest(cut, manifest)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.12')
    capsys.readouterr()
    run(_cfg(store, cut, steps=6, decay_end_step=6, checkpoint_every=2, keep_checkpoints=3, log_every=1))
    said = " ".join(capsys.readouterr().err.split())
    assert "skipping checkpoint step_00000006.safetensors" in said and "resuming from step_00000004" in said
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _weights(full, name), _weights(cut, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = load_state(full / "checkpoints" / "step_00000006.safetensors")["optimizer"]["state"]
    opt_b = load_state(cut / "checkpoints" / "step_00000006.safetensors")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing logged twice
    # Running the finished command again does nothing.
    before = (cut / "model_ema.safetensors").stat().st_mtime_ns
    run(_cfg(store, cut, steps=6, decay_end_step=6, checkpoint_every=2, keep_checkpoints=3, log_every=1))
    assert (cut / "model_ema.safetensors").stat().st_mtime_ns == before


def _step_gradients(grad_accum: int, x, labels, share=None) -> dict[str, torch.Tensor]:
    """The gradient one training step applies (captured at the optimiser), in float64."""
    from stages.models.dit import create_dit
    from stages.train.diffusion_step import DiffusionTraining

    torch.manual_seed(0)
    model = create_dit("ditdh-s", 96, 4, 10, **{k: v for k, v in TINY.items() if k != "model"}).double()
    with torch.no_grad():  # move adaLN-Zero's zero layers, so every parameter has a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = TrainDiffusionConfig(latents="-", out="-", **TINY, batch_size=8, grad_accum=grad_accum,
                               precision="fp32", device="cpu")
    trainer = DiffusionTraining(model, cfg, torch.device("cpu"), shift=1.0, null_label=10)
    if share is not None:  # this process's share of the global batch (as a rank's)
        trainer.share = slice(*share)
        x, labels = x[share[0]: share[1]], labels[share[0]: share[1]]
    grads = {}
    trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the noise, times and loss in float64 too
    try:
        trainer.train_step(3, x, labels, lr=1e-3)
    finally:
        torch.set_default_dtype(default)
    return grads


def test_gradient_accumulation_gives_the_batch_gradient():
    """--grad-accum A: each micro-batch's loss is its mean over B/A samples, divided by A, so the
    summed gradients are the batch mean's. Multi-process equality is exact (test_pipeline_chain.py);
    within one process the micro-batches change only the order of floating-point sums. Error model,
    in float64 (u = 2^-53 = 1.1e-16): reordering a sum of n terms moves it by at most n u sum|terms|;
    here n <= 8 samples x 16 tokens x 192 features and the backward chains ~20 such sums, so the
    relative error of the gradient is far below 20 * 3e4 * u ~ 7e-11, on any CPU or thread count. The
    bound 1e-9 still catches any real bug by orders of magnitude: a lost micro-batch or a missing 1/A
    (checked below) moves the gradient by more than 10%."""
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(8, 96, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    whole = _step_gradients(1, x, labels)
    assert len(whole) > 10

    def rel(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)

    for accum in (2, 4):
        got = _step_gradients(accum, x, labels)
        assert got.keys() == whole.keys() and rel(got, whole) < 1e-9, accum
    # What the bound is for: rank 0's gradient without the all-reduce (samples 0-3 of the global batch
    # of 8, i.e. a lost micro-batch) is far outside it.
    half = _step_gradients(1, x, labels, share=(0, 4))
    assert rel(half, whole) > 0.1


def test_nan_loss_stops_with_one_line_error_and_keeps_last_checkpoint(tmp_path):
    n, batch = 64, 8
    latents = np.random.default_rng(0).standard_normal((n, 16, 4, 4)).astype(np.float32)
    labels = np.arange(n) % 4
    plan = BatchPlan(np.arange(n), batch, seed=0)
    seen = set(np.concatenate([plan.batch(s) for s in range(3)]).tolist())
    bad = next(i for i in plan.batch(3).tolist() if i not in seen)  # first read at step 3
    latents[bad, 5, 1, 2] = np.nan
    store = tmp_path / "nan.zarr"
    _write_store(store, latents, labels)
    out = tmp_path / "run"
    cfg = _cfg(store, out, batch_size=batch, steps=8, decay_end_step=8, checkpoint_every=2, log_every=4, sample_every=0)
    proc = run_rae(*_cli_args(cfg), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN" in errors[0] and "step 3" in errors[0] and "step 2" in errors[0]
    # The last good checkpoint is the one before the bad step, finite and loadable; the run is unfinished.
    state = load_state(checkpoints(out)[0])
    assert state["step"] == 2
    assert all(v.isfinite().all() for part in ("model", "ema") for v in state[part].values())
    assert not read_manifest(out, require_complete=False)["complete"]
    assert not (out / "model_ema.safetensors").exists()


def test_unfinished_store_is_refused(tmp_path):
    store = tmp_path / "half.zarr"
    _write_store(store, np.zeros((16, 16, 4, 4), np.float32), np.arange(16) % 2, complete=False)
    with pytest.raises(ArtifactError, match="unfinished"):
        run(_cfg(store, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_changed_configuration_is_refused_unless_overwrite(store, tmp_path):
    out = tmp_path / "run"
    run(_cfg(store, out, steps=2, sample_every=0))
    with pytest.raises(ArtifactError, match=r"made differently \(--lr 0.001 there, 0.0005 here\)"):
        run(_cfg(store, out, steps=2, sample_every=0, lr=5e-4))
    run(_cfg(store, out, steps=2, sample_every=0, lr=5e-4, overwrite=True))
    assert read_manifest(out)["config"]["lr"] == 5e-4


def test_model_narrower_than_tokens_is_warned_loudly(store, tmp_path, capsys):
    result = run(_cfg(store, tmp_path / "run", steps=1, sample_every=0, head_width=64))
    assert "width rule" in capsys.readouterr().err
    assert "64 < token dimension 96" in result["warning"]
    assert read_manifest(tmp_path / "run")["warnings"] == [result["warning"]]


def test_bad_settings_are_one_line_errors(store, tmp_path):
    with pytest.raises(RaeError, match="grad-accum"):
        run(_cfg(store, tmp_path / "a", grad_accum=3))
    with pytest.raises(RaeError, match="unknown --model"):
        run(_cfg(store, tmp_path / "b", model="dit-q"))


def test_stop_after_checkpoints_and_the_same_command_ends_as_an_uninterrupted_run(store, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(_cfg(store, full, steps=6, decay_end_step=6, checkpoint_every=4, log_every=2))
    args = _cli_args(_cfg(store, cut, steps=6, decay_end_step=6, checkpoint_every=4, log_every=2))
    first = run_rae(*args, "--stop-after", 3)
    assert "stopped at step 3/6" in first.stderr and "run the same command again" in first.stderr
    assert load_state(checkpoints(cut)[0])["step"] == 3 and not read_manifest(cut, require_complete=False)["complete"]
    run_rae(*args, "--stop-after", 3)  # a second stop at the same step: nothing to train, still resumable
    run_rae(*args)
    for name in ("model_ema.safetensors", "model.safetensors"):
        a, b = _weights(full, name), _weights(cut, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert read_manifest(cut)["complete"] and read_manifest(cut)["step"] == 6


def test_architecture_switches_train_and_are_recorded_and_options_added_later_keep_old_identities(store, tmp_path):
    out = tmp_path / "run"
    argv = _cli_args(_cfg(store, out, steps=2, sample_every=0))
    run_rae(*argv, "--qk-norm", "--no-swiglu", "--wo-shift", "--no-pos-embed")
    kwargs = json.loads((out / "config.json").read_text())["model"]["kwargs"]
    assert {k: v for k, v in kwargs.items() if k.startswith(("use_", "wo_"))} == dict(
        use_qknorm=True, use_swiglu=False, wo_shift=True, use_pos_embed=False)
    model = load_diffusion_run(out).model
    assert model.blocks[0].attn.qk_norm and model.pos_embed is None
    # Another switch is another run: refused as made differently.
    proc = run_rae(*argv, "--qk-norm", "--no-swiglu", "--wo-shift", check=False)
    assert proc.returncode == 1 and "--pos-embed" in proc.stderr
    # Options added after runs existed are out of the identity at their defaults: older runs resume.
    identity = _cfg(store, out).identity()
    assert not set(TrainDiffusionConfig.LATER) & set(identity)
    assert _cfg(store, out, qk_norm=True).identity()["qk_norm"] is True
