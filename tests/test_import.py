"""`rae import`: the paper's released files (reference key names, wrapped as the authors' code saves
them) become runs that load to the very same models, and bad files never leave a complete artifact."""
import json
import math
import os

import numpy as np
import pytest
import torch

from stages.artifacts.checkpoint import load_weights
from stages.importer import decoder_architecture
from stages.artifacts.manifest import read_manifest
from stages.models import decoder as dec
from stages.models import dit
from stages.artifacts.runs import load_decoder_run, load_diffusion_run
from stages.digests import sha256_file
from tests.helpers import run_rae

# The demonstration encoder's latents: dinov2-demo at 64 px gives [96, 4, 4].
LATENT = (96, 4, 4)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor moved off its initial value (adaLN-Zero layers start at zero, the CLS token too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_decoder(seed: int) -> dec.ViTDecoder:
    return _randomised(dec.ViTDecoder(in_dim=96, grid=4, patch_size=16, width=64, depth=2, heads=4, mlp_dim=128), seed)


def tiny_dit(seed: int, head: bool = True) -> torch.nn.Module:
    if head:
        model = dit.DiTDH(in_channels=96, input_size=4, width=32, depth=2, num_heads=2, head_width=128,
                          head_depth=1, head_num_heads=4, num_classes=10)
    else:
        model = dit.DiT(in_channels=96, input_size=4, width=32, depth=2, num_heads=2, num_classes=10)
    return _randomised(model, seed)


def reference_stats(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT, generator=g), torch.rand(LATENT, generator=g) + 0.1


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def _not_complete(out) -> bool:
    return not (out / "manifest.json").exists() or not read_manifest(out, require_complete=False).get("complete")


z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))


# ---- decoder ---------------------------------------------------------------------------------

def _wrap_decoder(how: str, ema: dict, raw: dict) -> dict:
    if how == "plain":  # the released model.pt: the GeneralDecoder's state dict
        return ema
    if how == "ddp":
        return {"state_dict": {"module." + k: v for k, v in ema.items()}}
    # A stage-1 training checkpoint: whole RAEs (frozen encoder included) under "model" and "ema".
    def rae(sd):
        return {"encoder.blocks.0.weight": torch.ones(3), **{"decoder." + k: v for k, v in sd.items()}}
    return {"step": 1234, "epoch": 3, "model": rae(raw), "ema": rae(ema),
            "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("how", ["plain", "ddp", "training-checkpoint"])
def test_decoder_import_decodes_exactly_as_the_source_and_round_trips(tmp_path, how):
    ema_model, raw_model = tiny_decoder(0), tiny_decoder(1)
    ref = dec.to_reference_state_dict(ema_model.state_dict())
    torch.save(_wrap_decoder(how, ref, dec.to_reference_state_dict(raw_model.state_dict())), tmp_path / "model.pt")
    (tmp_path / "encoder.safetensors").write_bytes(b"the encoder's weights")
    run_rae("import", "decoder", tmp_path / "model.pt", "--out", tmp_path / "dec", "--encoder", "dinov2-demo",
            "--heads", "4", "--encoder-weights", tmp_path / "encoder.safetensors")

    loaded, info = load_decoder_run(tmp_path / "dec")
    with torch.no_grad():
        assert torch.equal(loaded(z), ema_model(z))
    _assert_same_tensors(dec.to_reference_state_dict(loaded.state_dict()), ref)
    assert info["latent_shape"] == list(LATENT) and info["image_size"] == 64
    assert info["encoder"]["name"] == "dinov2-demo" and info["encoder"]["latent_shape"] == list(LATENT)
    # As `rae encode --encoder-weights FILE` records it, so `rae decode` accepts that store's latents.
    assert info["encoder"]["weights_sha256"] == sha256_file(tmp_path / "encoder.safetensors")
    manifest = read_manifest(tmp_path / "dec", kind="decoder-run")
    assert manifest["imported_from"]["step"] == (1234 if how == "training-checkpoint" else None)
    if how == "training-checkpoint":  # the raw weights too, for `rae decode --no-ema`
        raw, _ = load_decoder_run(tmp_path / "dec", ema=False)
        with torch.no_grad():
            assert torch.equal(raw(z), raw_model(z))
    else:
        assert not (tmp_path / "dec" / "decoder.safetensors").exists()


def test_decoder_heads_come_from_the_reference_config_of_its_width():
    with torch.device("meta"):
        xl = dec.create_decoder("vit-xl", in_dim=768, grid=16, patch_size=16).state_dict()
        b_like = dec.ViTDecoder(in_dim=768, grid=16, patch_size=32, width=768, depth=2, heads=1, mlp_dim=64)
        b_like = b_like.state_dict()
    arch, name = decoder_architecture(xl)
    assert name == "vit-xl" and arch == dict(in_dim=768, grid=16, patch_size=16, **dec.DECODER_SIZES["vit-xl"])
    arch, name = decoder_architecture(b_like)
    assert name is None and arch["heads"] == 12 and arch["patch_size"] == 32 and arch["depth"] == 2


# ---- statistics and diffusion -----------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Imported once through the command line: statistics saved with a leading batch axis
    ([1, C, h, w]), a DiT^DH training checkpoint (ema + model + optimizer) using them, a plain DiT^DH
    (the guide) with a [C, h, w] stat.pt given directly, and a decoder."""
    d = tmp_path_factory.mktemp("imported")
    mean, var = reference_stats()
    torch.save({"mean": mean[None], "var": var[None]}, d / "stat_batch_axis.pt")
    torch.save({"mean": mean, "var": var}, d / "stat.pt")
    run_rae("import", "stats", d / "stat_batch_axis.pt", "--out", d / "stats")
    models = {"ema": tiny_dit(2), "raw": tiny_dit(3), "guide": tiny_dit(4), "decoder": tiny_decoder(5)}
    refs = {k: dit.to_reference_state_dict(m) for k, m in models.items() if k != "decoder"}
    torch.save({"step": 7, "model": refs["raw"], "ema": refs["ema"], "optimizer": {"state": {}, "param_groups": []}},
               d / "xl.pt")
    torch.save(refs["guide"], d / "s.pt")
    torch.save(dec.to_reference_state_dict(models["decoder"].state_dict()), d / "model.pt")
    demo = ("--encoder", "dinov2-demo")
    run_rae("import", "diffusion", d / "xl.pt", "--out", d / "xl", "--stats", d / "stats", *demo)
    run_rae("import", "diffusion", d / "s.pt", "--out", d / "s", "--stats", d / "stat.pt", *demo)
    run_rae("import", "decoder", d / "model.pt", "--out", d / "dec", "--heads", "4", *demo)
    return d, models, refs, (mean, var)


def test_stats_import_keeps_mean_and_var(imported):
    d, _, _, (mean, var) = imported
    _assert_same_tensors(load_weights(d / "stats" / "latent_stats.safetensors"), {"mean": mean, "var": var})
    manifest = read_manifest(d / "stats", kind="latent-stats")  # a complete artifact, as every rae output
    assert manifest["latent_shape"] == list(mean.shape) and manifest["imported_from"]["sha256"]
    assert "latent-stats" in run_rae("info", d / "stats").stdout


def test_diffusion_import_predicts_exactly_as_the_source_and_round_trips(imported):
    d, models, refs, (mean, var) = imported
    x, t, y = torch.randn(3, *LATENT), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 10])
    for run, weights, ema in (("xl", "ema", True), ("xl", "raw", False), ("s", "guide", True)):
        loaded = load_diffusion_run(d / run, ema=ema)
        with torch.no_grad():
            assert torch.equal(loaded.model(x, t, y), models[weights](x, t, y)), (run, weights)
        _assert_same_tensors(dit.to_reference_state_dict(loaded.model), refs[weights])
        assert torch.equal(loaded.mean, mean) and torch.equal(loaded.var, var)
        assert loaded.latent_shape == list(LATENT) and loaded.num_classes == 10 and loaded.null_label == 10
        assert loaded.config["model"]["class"] == "DiTDH" and loaded.config["eps"] == 1e-5
        # The reference's dimension-dependent shift: sqrt(C*h*w / 4096).
        assert loaded.shift == pytest.approx(math.sqrt(96 * 4 * 4 / 4096))
        assert loaded.encoder["name"] == "dinov2-demo"
    assert read_manifest(d / "xl", kind="diffusion-run")["imported_from"]["step"] == 7
    assert not (d / "s" / "model.safetensors").exists()  # a plain file holds the EMA weights only


def test_diffusion_import_of_a_plain_dit_with_prefixes(tmp_path):
    model = tiny_dit(6, head=False)
    torch.save({"module._orig_mod." + k: v.half() for k, v in dit.to_reference_state_dict(model).items()},
               tmp_path / "dit.pt")
    mean, var = reference_stats()
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    proc = run_rae("import", "diffusion", tmp_path / "dit.pt", "--out", tmp_path / "run", "--stats",
                   tmp_path / "stat.pt", "--encoder", "dinov2-demo", "--shift", "2.5")
    assert "width" in proc.stderr  # a 32-wide DiT breaks the paper's width rule for 96-channel tokens
    run = load_diffusion_run(tmp_path / "run")
    loaded = run.model
    assert run.config["model"]["class"] == "DiT" and run.shift == 2.5
    x, t, y = torch.randn(2, *LATENT), torch.tensor([0.2, 0.7]), torch.tensor([1, 10])
    with torch.no_grad():  # the file held float16 weights: the run holds them exactly, as float32
        for p in model.parameters():
            p.copy_(p.half().float())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


# ---- bad input -----------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_files_give_one_line_errors_and_no_complete_artifact(tmp_path):
    torch.save(dec.to_reference_state_dict(tiny_decoder(0).state_dict()), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    marker = tmp_path / "code-ran"
    torch.save({"decoder_embed.weight": torch.zeros(2), "x": _RunsCode(marker)}, tmp_path / "pickled.pt")
    torch.save(dict(zip(("mean", "var"), reference_stats())), tmp_path / "stat.pt")
    cases = {"truncated.pt": "truncated", "notes.pt": "not a complete PyTorch checkpoint",
             "pickled.pt": "pickled Python objects", "stat.pt": "not a reference decoder"}
    for name, expected in cases.items():
        out = tmp_path / f"out_{name}"
        line = _one_line_error(run_rae("import", "decoder", tmp_path / name, "--out", out, "--heads", "4",
                                       "--encoder", "dinov2-demo", check=False))
        assert expected in line, line
        assert _not_complete(out)
    assert not marker.exists()  # weights_only loading never ran the pickled call

    # A latent shape that the encoder cannot give, and a diffusion import without statistics.
    line = _one_line_error(run_rae("import", "decoder", tmp_path / "good.pt", "--out", tmp_path / "d", "--heads", "4",
                                   check=False))
    assert "dinov2-b" in line and _not_complete(tmp_path / "d")
    _one_line_error(run_rae("import", "diffusion", tmp_path / "good.pt", "--out", tmp_path / "d", check=False))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    torch.save(dec.to_reference_state_dict(tiny_decoder(0).state_dict()), tmp_path / "model.pt")
    args = ("import", "decoder", tmp_path / "model.pt", "--out", tmp_path / "dec", "--heads", "4",
            "--encoder", "dinov2-demo")
    run_rae(*args)
    assert "--overwrite" in _one_line_error(run_rae(*args, check=False))
    run_rae(*args, "--overwrite")
    assert read_manifest(tmp_path / "dec")["complete"]


# ---- end to end ------------------------------------------------------------------------------------

def test_imported_models_sample_with_autoguidance_and_decode(imported, tmp_path):
    d, models, _, _ = imported
    run_rae("sample", "--model", d / "xl", "--out", tmp_path / "s.zarr", "--per-class", "1", "--guidance",
            "autoguidance", "--guide-model", d / "s", "--ag-scale", "1.42", "--solver", "euler-ref", "--steps", "3",
            "--device", "cpu")
    run_rae("decode", tmp_path / "s.zarr", "--decoder", d / "dec", "--out", tmp_path / "img", "--device", "cpu")
    with np.load(tmp_path / "img" / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 64, 64, 3) and sorted(f["arr_1"].tolist()) == list(range(10))
    sampling = json.loads((tmp_path / "s.zarr" / "manifest.json").read_text())["sampling"]
    assert sampling["guidance"] == "autoguidance" and sampling["shift"] == pytest.approx(math.sqrt(96 * 16 / 4096))


def test_imagenet512_release_imports_samples_with_autoguidance_and_decodes_at_512(tmp_path):
    """The four released 512 files (ViTXL_n08_i512, imagenet1k_512/stat.pt, DiTDH-XL_ep400 and its
    DiTDH-S_ep20 guide) on the [C, 32, 32] grid of DINOv2 at 448 px (tiny widths, real grid), then
    `--preset imagenet512` sampling (AutoGuidance 1.5, the shift of a 32 x 32 grid) and decoding to
    512 px, all through the command line."""
    c, grid = 96, 32
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(c, grid, grid, generator=g), torch.rand(c, grid, grid, generator=g) + 0.1
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")

    def dit_512(seed, width):
        return _randomised(dit.DiTDH(in_channels=c, input_size=grid, width=width, depth=1, num_heads=2,
                                     head_width=128, head_depth=1, head_num_heads=4, num_classes=10), seed)

    xl, s = dit_512(1, 48), dit_512(2, 32)
    torch.save(dit.to_reference_state_dict(xl), tmp_path / "xl.pt")
    torch.save(dit.to_reference_state_dict(s), tmp_path / "s.pt")
    decoder = _randomised(dec.ViTDecoder(in_dim=c, grid=grid, patch_size=16, width=64, depth=1, heads=4, mlp_dim=128), 3)
    torch.save(dec.to_reference_state_dict(decoder.state_dict()), tmp_path / "model.pt")
    demo = ("--encoder", "dinov2-demo")
    run_rae("import", "stats", tmp_path / "stat.pt", "--out", tmp_path / "stats")
    run_rae("import", "diffusion", tmp_path / "xl.pt", "--out", tmp_path / "xl", "--stats", tmp_path / "stats", *demo)
    run_rae("import", "diffusion", tmp_path / "s.pt", "--out", tmp_path / "s", "--stats", tmp_path / "stats", *demo)
    run_rae("import", "decoder", tmp_path / "model.pt", "--out", tmp_path / "dec", "--heads", "4", *demo)
    for run in ("xl", "s"):
        info = json.loads((tmp_path / run / "config.json").read_text())
        assert info["latent_shape"] == [c, grid, grid] and info["image_size"] == 512
        assert info["flow"]["shift"] == pytest.approx(math.sqrt(c * grid * grid / 4096))
    run_rae("sample", "--model", tmp_path / "xl", "--out", tmp_path / "s.zarr", "--preset", "imagenet512",
            "--per-class", "1", "--classes", "3", "--classes", "7", "--guidance", "autoguidance",
            "--guide-model", tmp_path / "s", "--steps", "2", "--device", "cpu")
    sampling = read_manifest(tmp_path / "s.zarr")["sampling"]
    assert sampling["guidance"] == "autoguidance" and sampling["scale"] == 1.5
    run_rae("decode", tmp_path / "s.zarr", "--decoder", tmp_path / "dec", "--out", tmp_path / "img", "--device", "cpu")
    with np.load(tmp_path / "img" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 512, 512, 3) and sorted(f["arr_1"].tolist()) == [3, 7]


def test_diffusion_import_carries_the_architecture_switches(tmp_path):
    """A reference checkpoint trained with QK-norm and a GELU MLP, without RoPE: the switches come from its
    tensors and are recorded in the run's config; the heads, which only RoPE tables show, are given."""
    torch.manual_seed(0)
    model = _randomised(dit.DiTDH(in_channels=96, input_size=4, width=32, depth=2, num_heads=2, head_width=128,
                                  head_depth=1, head_num_heads=4, num_classes=10, use_qknorm=True, use_swiglu=False,
                                  use_rope=False), 3)
    torch.save(dit.to_reference_state_dict(model), tmp_path / "qk.pt")
    mean, var = reference_stats()
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    args = ["import", "diffusion", tmp_path / "qk.pt", "--stats", tmp_path / "stat.pt", "--encoder", "dinov2-demo"]
    proc = run_rae(*args, "--out", tmp_path / "no", check=False)
    assert "no RoPE tables to show its attention heads: give --num-heads and --head-num-heads" in _one_line_error(proc)
    run_rae(*args, "--out", tmp_path / "run", "--num-heads", 2, "--head-num-heads", 4)
    run = load_diffusion_run(tmp_path / "run")
    kwargs = run.config["model"]["kwargs"]
    assert (kwargs["use_qknorm"], kwargs["use_swiglu"], kwargs["use_rope"]) == (True, False, False)
    assert "use_rmsnorm" not in kwargs  # the paper's default, not recorded
    x, t, y = torch.randn(2, *LATENT), torch.tensor([0.2, 0.7]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(run.model(x, t, y), model.eval()(x, t, y))


def _hf_cache(home, repo: str, files: dict) -> None:
    """Files in the Hugging Face cache layout under HF_HOME=home, as a download leaves them."""
    commit = "0" * 40
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, writer in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)


def test_released_files_by_hugging_face_name(tmp_path):
    model = tiny_dit(4)
    mean, var = reference_stats()
    repo = "nyu-visionx/RAE-collections"
    _hf_cache(tmp_path / "hf", repo, {
        "DiTDH-tiny/stage2_model.pt": lambda p: torch.save(dit.to_reference_state_dict(model), p),
        "stats/stat.pt": lambda p: torch.save({"mean": mean, "var": var}, p)})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run_rae("import", "diffusion", f"hf://{repo}/DiTDH-tiny/stage2_model.pt", "--stats", f"hf://{repo}/stats/stat.pt",
            "--encoder", "dinov2-demo", "--out", tmp_path / "run", env=env)
    run = load_diffusion_run(tmp_path / "run")
    x, t, y = torch.randn(2, *LATENT), torch.tensor([0.2, 0.7]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(run.model(x, t, y), model.eval()(x, t, y))
    assert read_manifest(tmp_path / "run")["config"]["hf_names"] == {
        "source": f"hf://{repo}/DiTDH-tiny/stage2_model.pt", "stats": f"hf://{repo}/stats/stat.pt"}
    # Not in the cache and no network: one line naming the file, its address and the cache.
    proc = run_rae("import", "decoder", f"hf://{repo}/decoders/model.pt", "--out", tmp_path / "dec", env=env,
                   check=False)
    line = _one_line_error(proc)
    assert f"hf://{repo}/decoders/model.pt is not in the Hugging Face cache" in line
    assert f"https://huggingface.co/{repo}/resolve/main/decoders/model.pt" in line
    assert not (tmp_path / "dec").exists()
    proc = run_rae("import", "decoder", "hf://only-a-repo", "--out", tmp_path / "dec", env=env, check=False)
    assert "a Hugging Face file is hf://OWNER/REPO/PATH" in _one_line_error(proc)
