"""stages.eval.evaluate / rae eval: formats, references, the weights paths, and whole runs (1 and 2 ranks).

Networks are the real ones (torch-fidelity's InceptionV3, timm's DINOv2 ViT-S/14) with random
weights that the tests write to files and load through the real loading paths.

Floating-point comparisons are exact where both sides run the same operations on the same inputs;
otherwise the tolerance comes from the error model written beside it (u64 = 2^-53, u16 = 2^-11), so it
holds on any CPU, BLAS kernel, vector instruction set and thread count."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.eval import metrics as M
from stages.errors import ArtifactError, RaeError
from stages.eval.features import Collector
from stages.eval.inputs import ImageSet, read_adm_npz, save_adm_npz
from stages.eval.nets import inception_cache_path, load_dinov2, load_inception
from stages.eval.refs import RefStats, load_ref_stats, open_reference, save_ref_stats
from stages.eval.evaluate import EvalConfig, run
from stages.artifacts.manifest import new_manifest, write_manifest
from stages.models.weights import MissingWeightsError, WeightsFileError
from tests.helpers import INCEPTION_FILE, smooth_images, write_folder

U64, U16 = 2.0**-53, 2.0**-11
DINO_SMALL = "vit_small_patch14_dinov2.lvd142m"


def _rae_image_folder(folder: Path, images: np.ndarray) -> Path:
    """A finished `rae decode` folder as eval sees it: numbered PNGs and a complete image-folder manifest."""
    write_folder(folder, images)
    write_manifest(folder, {**new_manifest("image-folder", None), "complete": True})
    return folder


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model(DINO_SMALL, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14.safetensors"
    save_file(vit.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_images")
    a = write_folder(root / "a", smooth_images(4, 48, seed=0))
    b = write_folder(root / "b", smooth_images(4, 48, seed=1, brightness=60))
    return a, b


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Results written by default to the current folder go to the test's own."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty torch hub cache: no Inception weights anywhere."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path


# ---------------------------------------------------------------- formats


def test_adm_npz_round_trip_is_exact_and_memory_mapped(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    labels = np.arange(5)
    save_adm_npz(tmp_path / "s.npz", images, labels)
    with np.load(tmp_path / "s.npz") as z:  # what the ADM suite reads
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    back = read_adm_npz(tmp_path / "s.npz")
    assert isinstance(back, np.memmap)
    np.testing.assert_array_equal(back, images)
    s = ImageSet(tmp_path / "s.npz")
    assert len(s) == 5 and s.kind == "npz"
    np.testing.assert_array_equal(s[3], images[3])


def test_compressed_npz_is_read_and_bad_arrays_are_refused(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    np.testing.assert_array_equal(read_adm_npz(tmp_path / "c.npz"), images)
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ArtifactError, match="uint8 N x H x W x 3"):
        ImageSet(tmp_path / "f.npz")


def test_reference_statistics_round_trip_npz_and_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    stats = RefStats(mu=rng.standard_normal(5), sigma=np.eye(5), pool=rng.standard_normal((7, 5)).astype(np.float32),
                     dinov2_mu=rng.standard_normal(3), dinov2_sigma=2 * np.eye(3),
                     meta={"num_images": 7, "inception": {"weights_sha256": "ab" * 32}})
    for name in ("ref.npz", "ref.safetensors"):
        save_ref_stats(tmp_path / name, stats)
        back = load_ref_stats(tmp_path / name)
        for k in RefStats.ARRAYS:
            np.testing.assert_array_equal(getattr(back, k), getattr(stats, k))
        assert back.meta["num_images"] == 7 and back.meta["format"] == "rae-eval-stats"
        assert back.meta["inception"]["weights_sha256"] == "ab" * 32
        assert open_reference(tmp_path / name).kind == "stats"
    with pytest.raises(RaeError, match=".npz or .safetensors"):
        save_ref_stats(tmp_path / "ref.pkl", stats)


def test_open_reference_tells_adm_batches_images_and_folders_apart(tmp_path, folders):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    adm = open_reference(tmp_path / "adm.npz")
    assert adm.kind == "adm-ref-batch" and len(adm.images) == 4 and adm.stats.sigma.dtype == np.float64
    assert open_reference(tmp_path / "imgs.npz").kind == "npz"
    assert open_reference(folders[0]).kind == "folder"
    with pytest.raises(ArtifactError, match="not found"):
        open_reference(tmp_path / "missing.npz")


# ---------------------------------------------------------------- weights


def test_offline_without_inception_weights_is_one_clear_line(no_cache):
    with pytest.raises(MissingWeightsError) as e:
        load_inception(offline=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert INCEPTION_FILE in msg and str(inception_cache_path().parent) in msg and "--inception-weights" in msg
    assert str(no_cache / "empty_torch_home") in msg
    with pytest.raises(MissingWeightsError, match="not found: /nowhere"):
        load_inception("/nowhere/inception.pth")


def test_inception_features_through_torch_fidelity_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    net = load_inception(offline=True)  # found where torch-fidelity's own download would have put it
    assert net.identity["weights"] == str(torch_home / "hub" / "checkpoints" / INCEPTION_FILE)
    assert net.identity["official"] is False  # random test weights: not the published file's digest
    x = torch.from_numpy(smooth_images(2, 40, seed=5)).permute(0, 3, 1, 2).contiguous()
    pool, logits = net(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all() and pool.std() > 0
    # The same file through --inception-weights gives the same features (same weights, same kernels).
    same, _ = load_inception(torch_home / "hub" / "checkpoints" / INCEPTION_FILE)(x)
    assert torch.equal(same, pool)


def test_inception_file_of_the_wrong_network_is_one_line_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "not_inception.safetensors"))
    with pytest.raises(WeightsFileError) as e:
        load_inception(tmp_path / "not_inception.safetensors")
    assert "\n" not in str(e.value) and "InceptionV3" in str(e.value)


def test_dinov2_loads_from_a_file_at_224_with_the_hub_position_embedding(dino_file):
    net = load_dinov2(DINO_SMALL, dino_file, offline=True)
    assert net.vit.pos_embed.shape == (1, 1 + 16 * 16, 384)
    feats = net(torch.from_numpy(smooth_images(2, 64, seed=3)).permute(0, 3, 1, 2).contiguous())
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()
    with pytest.raises(MissingWeightsError, match="--dinov2-weights"):
        load_dinov2("vit_small_patch14_reg4_dinov2.lvd142m", None, offline=True)


# ---------------------------------------------------------------- whole runs


def test_eval_end_to_end_fid_is_pr_kid_then_save_ref_and_reuse(torch_home, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    # The four runs load the same Inception file: read it once (~1 s each; loading is tested above).
    import stages.eval.evaluate

    real_load, loaded = stages.eval.evaluate.load_inception, {}

    def load_once(*args):
        if repr(args) not in loaded:
            loaded[repr(args)] = real_load(*args)
        return loaded[repr(args)]

    monkeypatch.setattr(stages.eval.evaluate, "load_inception", load_once)
    a, b = folders
    base = dict(metrics=("fid", "is", "pr", "kid"), offline=True, num_workers=0, device="cpu", kid_subsets=5)
    r = run(EvalConfig(images=str(a), ref=str(b), save_ref=str(tmp_path / "a_stats.safetensors"), **base))
    m = r["metrics"]
    assert set(m) == {"fid", "is", "is_std", "precision", "recall", "kid", "kid_std"} and r["skipped"] == {}
    # FID(A, B) = 10.3 here; IS = exp(KL) >= 1 (KL = 4e-5 here, float64 rounding ~1e-13)
    assert np.isfinite(m["fid"]) and m["fid"] > 1 and m["is"] >= 1.0 and 0 <= m["precision"] <= 1
    assert r["num_images"] == 4 and r["num_ref_images"] == 4 and r["fid_reference"] == "computed from the reference images"
    on_disk = json.loads((tmp_path / "a.eval.json").read_text())  # a is no rae folder: not written into it
    assert on_disk["metrics"] == m  # JSON writes floats with repr: exact round trip
    assert on_disk["extractors"]["inception"]["weights_sha256"] == r["extractors"]["inception"]["weights_sha256"]
    assert len(on_disk["reference"]["stats_sha256"]) == 64 and on_disk["reference"]["kind"] == "folder"

    # An ADM reference batch: FID against its mu/sigma (here A's own), precision/recall against its images
    # (B's: the same as above). FID's maths is test_metrics' and the first run's; what matters here is
    # which statistics it is given, so frechet_distance is spied on (and the 2048 x 2048 eigenproblems,
    # seconds each, are skipped).
    saved = load_ref_stats(tmp_path / "a_stats.safetensors")
    assert saved.pool.shape == (4, 2048) and saved.sigma.shape == (2048, 2048)
    b_images = np.stack([np.asarray(Image.open(p)) for p in sorted(b.glob("*.png"))])
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=b_images, mu=saved.mu, sigma=saved.sigma)
    calls = []
    with monkeypatch.context() as spy:
        spy.setattr(M, "frechet_distance", lambda *stats: calls.append(stats) or 0.125)
        r_adm = run(EvalConfig(images=str(a), ref=str(tmp_path / "VIRTUAL_ref.npz"), out=str(tmp_path / "adm.json"),
                               **{**base, "metrics": ("fid", "pr")}))
    assert r_adm["reference"]["kind"] == "adm-ref-batch"
    assert r_adm["fid_reference"] == "precomputed mu/sigma of the reference" and r_adm["metrics"]["fid"] == 0.125
    # A's statistics, recomputed bit for bit (same images, batches and kernels, float64 sums in the same
    # order), against the batch's mu/sigma as stored: exact.
    (mu1, sigma1, mu2, sigma2), = calls
    for got, want in ((mu1, saved.mu), (sigma1, saved.sigma), (mu2, saved.mu), (sigma2, saved.sigma)):
        np.testing.assert_array_equal(got, want)
    # The same pool features on both sides (A's recomputed, B's from the same pixels): exactly the same
    assert (r_adm["metrics"]["precision"], r_adm["metrics"]["recall"]) == (m["precision"], m["recall"])

    # The cached statistics of A (its pool features) as the reference for A: precision = recall = 1, as
    # each point's float16 distance to itself (<= 8 u16 ||u||^2: float32 accumulation, float16 roundings
    # of the terms and sums) is below every radius (the farthest of the 3 others, minus as much).
    pool = saved.pool.astype(np.float64)
    sq = (pool ** 2).sum(1)
    radii = (sq[:, None] - 2 * pool @ pool.T + sq[None]).max(1)
    assert 2 * 8 * U16 * sq.max() < radii.min()
    r2 = run(EvalConfig(images=str(a), ref=str(tmp_path / "a_stats.safetensors"), out=str(tmp_path / "self.json"),
                        **{**base, "metrics": ("pr",)}))
    assert (r2["metrics"]["precision"], r2["metrics"]["recall"]) == (1.0, 1.0)
    assert r2["reference"]["kind"] == "stats" and len(r2["reference"]["sha256"]) == 64

    # Statistics made with other Inception weights are refused, not silently compared.
    saved.meta["inception"]["weights_sha256"] = "0" * 64
    save_ref_stats(tmp_path / "other.npz", saved)
    with pytest.raises(ArtifactError, match="other inception weights"):
        run(EvalConfig(images=str(a), ref=str(tmp_path / "other.npz"), **base))


def test_offline_eval_reports_psnr_ssim_and_fd_and_says_what_it_skipped(no_cache, folders, dino_file, tmp_path):
    a, _ = folders
    noisy = np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))]).astype(np.int16)
    noisy = (noisy + np.random.default_rng(0).integers(-8, 9, noisy.shape)).clip(0, 255).astype(np.uint8)
    save_adm_npz(tmp_path / "recon.npz", noisy)
    r = run(EvalConfig(images=str(tmp_path / "recon.npz"), ref=str(a), pairs=True, offline=True, num_workers=0,
                       device="cpu", fd_model=DINO_SMALL, dinov2_weights=str(dino_file)))
    m = r["metrics"]
    assert set(m) == {"psnr", "ssim", f"fd_{DINO_SMALL}"}
    # Seeded integer noise, uniform on [-8, 8] (clipped): PSNR 34.4 dB, exact up to float64 rounding (the
    # MSE of integer images is exact); SSIM 0.94. The random ViT's features are small: FD >= |mu1 - mu2|^2
    # = 2.2e-10, and float64 rounding (rank-3 covariances of 384-dim features, ||sigma|| = 4.3e-7) can
    # lower it by at most 2 * 381 sqrt(384 u64) ||sigma|| = 7e-11 (see test_metrics): FD > 0.
    assert 25 < m["psnr"] < 40 and 0 < m["ssim"] < 1 and m[f"fd_{DINO_SMALL}"] > 0
    assert set(r["skipped"]) == {"fid", "sfid", "is", "pr", "kid", "lpips"}  # LPIPS: --pairs' VGG16 is missing too
    assert all(INCEPTION_FILE in why for k, why in r["skipped"].items() if k != "lpips")
    assert "vgg16-397923af.pth" in r["skipped"]["lpips"]
    assert r["written"] == str(tmp_path / "recon.eval.json")  # in the current folder (the test's tmp_path)


def test_save_ref_of_an_adm_batch_keeps_its_fid_statistics(no_cache, dino_file, tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(2048), np.eye(2048) * 2.0
    np.savez(tmp_path / "VIRTUAL.npz", arr_0=smooth_images(4, 32, seed=7), mu=mu, sigma=sigma)
    r = run(EvalConfig(images=str(tmp_path / "VIRTUAL.npz"), save_ref=str(tmp_path / "v.npz"), metrics=("fd_dinov2",),
                       fd_model=DINO_SMALL, dinov2_weights=str(dino_file), offline=True, num_workers=0, device="cpu"))
    assert r["metrics"] == {} and r["saved_ref"] == str(tmp_path / "v.npz")
    saved = load_ref_stats(tmp_path / "v.npz")
    np.testing.assert_array_equal(saved.mu, mu)  # not the statistics of the 4 images it carries
    np.testing.assert_array_equal(saved.sigma, sigma)
    assert saved.pool is None and saved.dinov2_mu.shape == (384,)  # no Inception weights: no pool features


def test_eval_with_nothing_computable_fails_with_the_inception_line(no_cache, folders):
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        run(EvalConfig(images=str(folders[0]), ref=str(folders[1]), metrics=("fid", "is"), offline=True,
                       num_workers=0, device="cpu"))


def test_pairs_need_matching_image_sets(folders, tmp_path):
    save_adm_npz(tmp_path / "three.npz", np.zeros((3, 48, 48, 3), np.uint8))
    with pytest.raises(RaeError, match="3 images but 4 reference images"):
        run(EvalConfig(images=str(tmp_path / "three.npz"), ref=str(folders[0]), pairs=True, metrics=(), device="cpu"))


class _FakeInception:
    """Deterministic per-image stand-in for the network (pool features, logits), so that the test
    checks the reduction and gathering, not the convolutions."""

    def __call__(self, x):
        pool = x.double().mean((2, 3)).repeat(1, 683)[:, :2048] + x.double()[:, 0, 0, :1] * torch.linspace(0, 1, 2048)
        return pool.float(), pool[:, :1008].float() / 50


def _collect(images: torch.Tensor, rank: int, world: int) -> Collector:
    from stages import dist

    col = Collector(len(images), "cpu", inception=_FakeInception(), fid_stats=True, keep_pool=True, with_is=True,
                     is_split_size=4)
    mine = dist.shard(list(range(len(images))), rank, world)
    for s in range(0, len(mine), 3):
        idx = torch.tensor(mine[s:s + 3])
        col.update(images[idx], idx)
    return col.finish()


def _test_images():
    return torch.from_numpy(smooth_images(11, 8, seed=9)).permute(0, 3, 1, 2).contiguous()


def _two_rank_worker(rank, world, port, cfg_kwargs, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RAE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from stages import dist

    try:
        result = run(EvalConfig(**cfg_kwargs))  # PSNR/SSIM sums over each rank's share of the pairs
        col = _collect(_test_images(), rank, world)  # float64 statistics, IS parts, gathered features
        if rank == 0:
            mu, sigma = col.inc_stats.mean_cov()
            np.savez(Path(out_dir) / "ranks.npz", mu=mu, sigma=sigma, n=col.inc_stats.n, is_=col.is_parts.compute()[0],
                     pool=col.pool, metrics=json.dumps(result["metrics"]), world=result["protocol"]["world_size"])
    finally:
        dist.cleanup()


def test_two_ranks_reduce_to_the_single_process_numbers(folders, tmp_path):
    a, b = folders
    cfg = dict(images=str(a), ref=str(b), pairs=True, metrics=(), num_workers=0, device="cpu", batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Forked (not spawned) ranks where the platform can: no second import of torch and timm (~5 s). The
    # workers run on one thread each.
    import multiprocessing

    torch.multiprocessing.start_processes(
        _two_rank_worker, args=(2, port, {**cfg, "out": str(tmp_path / "2.json")}, str(tmp_path)), nprocs=2,
        join=True, start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    got = np.load(tmp_path / "ranks.npz")
    assert int(got["world"]) == 2

    single = run(EvalConfig(**{**cfg, "out": str(tmp_path / "1.json")}))["metrics"]
    multi = json.loads(str(got["metrics"]))
    assert set(single) == set(multi) == {"psnr", "ssim"}
    # Per-image PSNR is exact (integer MSE in float64, the same log10 of a 1-element tensor); only the
    # order of the 4-term float64 sum differs: <= 3 u64 relative.
    assert multi["psnr"] == pytest.approx(single["psnr"], rel=1e-14)
    # Per-image SSIM in float64 through convolutions whose kernels may differ with the thread count (the
    # ranks run one thread): each window's moments carry <= 67 u64 * 255^2 = 5e-10, moving its SSIM by
    # <= 4 * 5e-10 / C2 (58.5) = 3.4e-11 (see test_metrics), on either side.
    assert multi["ssim"] == pytest.approx(single["ssim"], rel=0, abs=1e-10)

    col = _collect(_test_images(), 0, 1)
    mu, sigma = col.inc_stats.mean_cov()
    assert int(got["n"]) == 11 and col.inc_stats.sum.dtype == torch.float64
    # The fake features are exact per image (integer pixel sums in float64, one rounding each), so the
    # gathered pool features are equal bit for bit, and the statistics differ only in the order of
    # their float64 sums over 11 images: the mean of positive values by <= 12 u64 relative ...
    feats = col.pool.astype(np.float64)
    assert feats.min() >= 0
    np.testing.assert_allclose(got["mu"], mu, rtol=1e-14, atol=0)
    # ... the covariance entries by <= 2 * 12 u64 * sum_k |x_ki x_kj| / (n - 1) on each side.
    bound = 2 * 2 * 12 * U64 * (np.abs(feats).T @ np.abs(feats)) / 10
    assert (np.abs(got["sigma"] - sigma) <= bound).all()
    # IS = exp(KL) per split (3 splits of <= 4 images): the KL is a difference of float64 sums of <= 4 x
    # 1008 terms of total size <= 4 log(1008) = 28, summed in other orders: <= 2 * 4032 u64 * 28 / 4
    # = 6.3e-12 on each KL, hence on each score (~1) and their mean.
    assert float(got["is_"]) == pytest.approx(col.is_parts.compute()[0], rel=1e-11)
    np.testing.assert_array_equal(got["pool"], col.pool)  # gathered back in image order
    np.testing.assert_array_equal(col.pool, _FakeInception()(_test_images())[0].numpy())


def test_cli_prints_a_table_and_user_errors_as_one_line(no_cache, folders, tmp_path):
    import typer
    from typer.testing import CliRunner

    from rae_cli.eval_cmd import report_eval

    app = typer.Typer()
    app.command("eval")(report_eval)
    app.command("noop")(lambda: None)  # two commands, so "eval" is a subcommand as in `rae eval`
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", str(folders[0]), "--ref", str(folders[0]), "--pairs", "--offline",
                             "--metrics", "fid", "--device", "cpu", "--num-workers", "0",
                             "--out", str(tmp_path / "e.json")])
    assert ok.exit_code == 0, ok.output
    assert "PSNR" in ok.output and "SSIM" in ok.output and "skipped" in ok.output
    assert f"note: {SAME}" in ok.output and f"wrote {tmp_path / 'e.json'}" in ok.output
    # SSIM of images with themselves: every window's ratio is 1 within 8 u64 (see test_metrics)
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["ssim"] == pytest.approx(1.0, rel=1e-14)
    bad = runner.invoke(app, ["eval", str(tmp_path / "missing"), "--offline"])
    assert bad.exit_code == 1 and "error:" in bad.output and "not found" in bad.output


# ---------------------------------------------------------------- where results go, what they say


def test_eval_json_goes_into_rae_folders_only_and_else_to_the_current_folder(folders, tmp_path, monkeypatch):
    ref = folders[1]
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    mine = write_folder(data / "mine", smooth_images(4, 48, seed=2))
    save_adm_npz(data / "mine.npz", smooth_images(4, 48, seed=2))
    decoded = _rae_image_folder(tmp_path / "decoded", smooth_images(4, 48, seed=3))
    save_adm_npz(decoded / "samples.npz", smooth_images(4, 48, seed=3))
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def written(images):
        return Path(run(EvalConfig(images=str(images), ref=str(ref), pairs=True, metrics=(), num_workers=0,
                                   device="cpu"))["written"])

    before = sorted(data.rglob("*"))
    # A user's folder or .npz is never written into (nor beside): NAME.eval.json in the current folder.
    assert written(mine) == cwd / "mine.eval.json" and written(data / "mine.npz") == cwd / "mine.eval.json"
    assert written(Path("..") / "data" / "mine") == cwd / "mine.eval.json"  # a relative path: printed absolute
    assert sorted(data.rglob("*")) == before
    # A `rae decode` folder keeps its eval.json inside, and its samples.npz its NAME.eval.json beside it.
    assert written(decoded) == decoded / "eval.json"
    assert written(decoded / "samples.npz") == decoded / "samples.eval.json"
    assert json.loads((decoded / "eval.json").read_text())["num_images"] == 4
    assert sorted(p.name for p in cwd.iterdir()) == ["mine.eval.json"]


SAME = "IMAGES and --ref are the same images: FID and the other distances are 0 by construction"


def test_images_scored_against_themselves_say_so(folders, tmp_path):
    a, b = folders

    def notes(images, ref):
        r = run(EvalConfig(images=str(images), ref=str(ref), pairs=True, metrics=(), num_workers=0, device="cpu",
                           out=str(tmp_path / "e.json")))
        assert json.loads((tmp_path / "e.json").read_text())["notes"] == r["notes"]
        return r["notes"]

    (tmp_path / "link").symlink_to(a)
    copy = write_folder(tmp_path / "copy", np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))]))
    assert notes(a, a) == notes(a, tmp_path / "link") == notes(copy, a) == [SAME]
    assert notes(a, b) == []
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    save_adm_npz(tmp_path / "x" / "s.npz", smooth_images(4, 16, seed=5))
    save_adm_npz(tmp_path / "y" / "s.npz", smooth_images(4, 16, seed=6))  # same name, size and shape: not the same
    (tmp_path / "s_link.npz").symlink_to(tmp_path / "x" / "s.npz")
    assert notes(tmp_path / "x" / "s.npz", tmp_path / "s_link.npz") == [SAME]
    assert notes(tmp_path / "x" / "s.npz", tmp_path / "y" / "s.npz") == []


def test_pairs_warn_about_differing_names_only_between_two_plain_folders(folders, tmp_path, capsys):
    a = folders[0]
    images = smooth_images(4, 48, seed=4)
    decoded = _rae_image_folder(tmp_path / "decoded", images)  # 000.png ...
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(plain / f"img_{i}.png")
    warning = "file names differ between the two folders"

    def pairs(x, y):
        capsys.readouterr()
        run(EvalConfig(images=str(x), ref=str(y), pairs=True, metrics=(), num_workers=0, device="cpu",
                       out=str(tmp_path / "e.json")))
        return capsys.readouterr().err

    assert warning not in pairs(decoded, plain) and warning not in pairs(plain, decoded)
    assert warning in pairs(a, plain)
