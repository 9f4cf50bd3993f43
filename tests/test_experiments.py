"""experiments/: the paper's findings as scripts over rae's own modules (EXPERIMENTS.md has the numbers)."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ENCODE_ARGS, REPO, THREADS, run_rae


def test_width_experiment_writes_table_plot_and_keeps_the_narrow_model_above_its_floor(demo_images, tmp_path):
    run_rae("encode", demo_images, "--out", tmp_path / "lat.zarr", *ENCODE_ARGS)  # tokens of dimension n = 96
    argv = [sys.executable, str(REPO / "experiments" / "width.py"), "--latents", str(tmp_path / "lat.zarr"), "--out",
            str(tmp_path / "w"), "--widths", "32,128", "--depth", "2", "--deep", "32x3", "--steps", "150",
            "--batch", "16", "--lr", "1e-3", "--device", "cpu"]
    env = {"RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "w" / "width.json").read_text())
    models = {(m["width"], m["depth"]): m for m in result["models"]}
    assert set(models) == {(32, 2), (128, 2), (32, 3)} and result["latent_shape"] == [96, 4, 4]
    # Theorem 1's floor for one latent: (n - d) / n; none at d >= n.
    assert models[(32, 2)]["floor"] == 64 / 96 and models[(128, 2)]["floor"] == 0
    # A width-32 model cannot go below it (its output lies in a 32-dimensional subspace of each token),
    # deeper or not; the wide one goes lower.
    for narrow in ((32, 2), (32, 3)):
        assert models[narrow]["final_loss"] > models[narrow]["floor"]
    assert models[(128, 2)]["final_loss"] < models[(32, 2)]["floor"]
    assert (tmp_path / "w" / "width.png").stat().st_size > 10_000 and "| 128 | 2 |" in (tmp_path / "w" / "width.md").read_text()
    # Run again: the models measured with these settings are kept, nothing is trained.
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads((tmp_path / "w" / "width.json").read_text()) == result


def test_shift_experiment_trains_both_runs_through_rae_and_scores_each_snapshot(demo_images, tmp_path):
    from stages.artifacts.runs import load_diffusion_run

    run_rae("encode", demo_images, "--out", tmp_path / "lat.zarr", *ENCODE_ARGS)
    argv = [sys.executable, str(REPO / "experiments" / "shift.py"), "--latents", str(tmp_path / "lat.zarr"), "--out",
            str(tmp_path / "s"), "--steps", "10", "--every", "5", "--batch", "8", "--num", "16", "--sample-batch", "8",
            "--device", "cpu", "--", "--preset", "demo", "--decay-end-step", "10", "--log-every", "5",
            "--no-tensorboard"]
    env = {"RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "with_shift step 5: FD" in proc.stdout + proc.stderr and "done:" in proc.stdout + proc.stderr
    scores = json.loads((tmp_path / "s" / "shift.json").read_text())["scores"]
    assert set(scores) == {"with_shift", "no_shift"} and all(set(v) == {"5", "10"} for v in scores.values())
    assert all(value > 0 for v in scores.values() for value in v.values())
    # The two runs differ only by the shift they train (and sample) with.
    assert load_diffusion_run(tmp_path / "s" / "with_shift").shift == 3.0  # the demo preset's
    assert load_diffusion_run(tmp_path / "s" / "no_shift").shift == 1.0
    assert "| 10 |" in (tmp_path / "s" / "shift.md").read_text() and (tmp_path / "s" / "shift.png").is_file()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "step 5: FD" not in output and "Shift experiment" in output  # nothing rescored
    assert json.loads((tmp_path / "s" / "shift.json").read_text())["scores"] == scores
    # On another machine, with shift.json alone: nothing is trained or scored, the table and plot are made again.
    for name in ("with_shift", "no_shift", "shift.md", "shift.png"):
        shutil.rmtree(tmp_path / "s" / name) if (tmp_path / "s" / name).is_dir() else (tmp_path / "s" / name).unlink()
    moved = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert moved.returncode == 0 and "done:" not in moved.stdout + moved.stderr, moved.stderr
    assert not (tmp_path / "s" / "with_shift").exists() and (tmp_path / "s" / "shift.png").is_file()
    assert "| 10 |" in (tmp_path / "s" / "shift.md").read_text()


def test_scores_are_saved_one_by_one(tmp_path, monkeypatch):
    """A killed experiment loses at most the score in progress: the results file is written after each."""
    sys.path.insert(0, str(REPO / "experiments"))
    import common

    monkeypatch.setattr(common, "sample_fd", lambda run_dir, step, *rest: step / 10)
    scores, saved = {"4": 0.4}, []
    common.score_snapshots("run", tmp_path, 2, 8, scores, 16, 8, None, "cpu", lambda: saved.append(dict(scores)))
    assert saved == [{"4": 0.4, "2": 0.2}, {"4": 0.4, "2": 0.2, "6": 0.6}, {"4": 0.4, "2": 0.2, "6": 0.6, "8": 0.8}]
    settings = {"steps": "8", "num": "16", "extra": ""}
    common.save_results(tmp_path / "r.json", settings, scores=scores)
    assert common.load_results(tmp_path / "r.json", settings)["scores"] == scores
    assert not (tmp_path / "r.json.tmp").exists()
    # Results of other settings are not mixed in: one line naming what differs, the file left as it was.
    with pytest.raises(SystemExit, match=r"other settings \(num\): give another --out"):
        common.load_results(tmp_path / "r.json", {**settings, "num": "8"})
    assert common.load_results(tmp_path / "r.json", settings)["scores"] == scores


def test_head_experiment_gives_each_model_the_same_training_flops(demo_images, tmp_path):
    run_rae("encode", demo_images, "--out", tmp_path / "lat.zarr", *ENCODE_ARGS)
    models = "dit-s:width=96:depth=2:num_heads=4,ditdh-s:width=32:depth=1:num_heads=2:head_width=96:head_depth=1:head_num_heads=4"
    argv = [sys.executable, str(REPO / "experiments" / "head.py"), "--latents", str(tmp_path / "lat.zarr"), "--out",
            str(tmp_path / "h"), "--models", models, "--budget", "0.000008", "--batch", "8", "--points", "2",
            "--num", "16", "--sample-batch", "8", "--device", "cpu", "--", "--warmup-steps", "0",
            "--decay-end-step", "4", "--log-every", "2", "--no-tensorboard"]
    env = {"RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "h" / "head.json").read_text())["models"]
    dit, ditdh = models.split(",")
    assert set(result) == {dit, ditdh}
    spent = {m: r["steps"] * 8 * r["gflop_per_image"] * 1e9 for m, r in result.items()}
    # Steps are whole multiples of the scoring points: each spends the budget to within one point's worth.
    for m, r in result.items():
        assert 8e9 - 2 * 8 * r["gflop_per_image"] * 1e9 < spent[m] <= 8e9 and len(r["scores"]) == 2
    assert result[dit]["gflop_per_image"] > result[ditdh]["gflop_per_image"]  # fewer steps for the dearer
    assert result[dit]["steps"] < result[ditdh]["steps"]
    assert (tmp_path / "h" / "head.png").is_file() and f"| {ditdh} |" in (tmp_path / "h" / "head.md").read_text()


def test_noise_aug_experiment_decodes_the_same_samples_with_each_decoder(demo_images, tmp_path):
    run_rae("encode", demo_images, "--out", tmp_path / "lat.zarr", "--preset", "demo", "--num-workers", 0,
            "--device", "cpu")
    argv = [sys.executable, str(REPO / "experiments" / "noise_aug.py"), "--latents", str(tmp_path / "lat.zarr"),
            "--images", str(demo_images), "--out", str(tmp_path / "n"), "--num", "8", "--diffusion-steps", "4",
            "--diffusion-batch", "8", "--diffusion-args", "--preset demo --decay-end-step 4 --no-tensorboard",
            "--sample-args", "--preset demo --steps 3", "--device", "cpu", "--", "--preset", "demo", "--steps", "3",
            "--batch-size", "8", "--lpips-start-step", "1", "--disc-start-step", "1", "--gan-start-step", "2",
            "--num-workers", "0", "--no-tensorboard"]
    env = {"RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "n"
    result = json.loads((out / "noise_aug.json").read_text())["results"]
    assert set(result) == {"0", "0.8"}
    for tau in ("0", "0.8"):  # each decoder trained with its own noise, scored on both sets
        assert json.loads((out / f"decoder_tau{tau}" / "config.json").read_text())["noise_tau"] == float(tau)
        assert result[tau]["recon"]["psnr"] > 0 and result[tau]["recon"]["fd_rae"] > 0 and result[tau]["gen"]["fd_rae"] > 0
        assert len(list((out / f"gen_tau{tau}").glob("0*.png"))) == 8 and len(list((out / f"recon_tau{tau}").glob("0*.png"))) == 40
    # The same sample latents, two decoders: different pictures of them.
    a, b = ((out / f"gen_tau{t}" / "000000.png").read_bytes() for t in ("0", "0.8"))
    assert a != b
    assert (out / "noise_aug.png").stat().st_size > 10_000 and "| 0.8 |" in (out / "noise_aug.md").read_text()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "tau 0:" not in again.stdout + again.stderr
    assert json.loads((out / "noise_aug.json").read_text())["results"] == result
    # The results file alone (another machine): nothing trained, sampled or decoded; the table and plot remade.
    for child in out.iterdir():
        if child.name != "noise_aug.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    alone = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    assert sorted(c.name for c in out.iterdir()) == ["noise_aug.json", "noise_aug.md", "noise_aug.png"]
    assert json.loads((out / "noise_aug.json").read_text())["results"] == result
    assert f"| 0.8 | {result['0.8']['recon']['psnr']:.2f} |" in (out / "noise_aug.md").read_text()
