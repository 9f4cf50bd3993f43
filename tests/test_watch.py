"""Watching a run: decoded previews of the periodic EMA samples (`train-diffusion --decoder`, or `rae
decode` of the saved latents later); snapshots (both trainers keep the EMA weights of every
--snapshot-every step for good; `rae sample --step N` and `rae decode --step N` use them, or a kept
checkpoint, of a finished run or one still training; `rae info` lists them)."""
import numpy as np
import pytest
import torch

from stages.artifacts.checkpoint import load_weights
from stages.artifacts.manifest import read_manifest
from stages.artifacts.runs import load_decoder_run, load_diffusion_run, saved_steps, snapshot_path
from stages.artifacts.store import LatentStore
from stages.errors import ArtifactError
from tests.helpers import DECODER_ARGS, DIFFUSION_ARGS, ENCODE_ARGS, SAMPLE_ARGS, run_rae


@pytest.fixture(scope="module")
def runs(demo_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    run_rae("encode", demo_images, "--out", root / "lat.zarr", *ENCODE_ARGS)
    run_rae("train-decoder", "--latents", root / "lat.zarr", "--out", root / "dec", *DECODER_ARGS, "--snapshot-every", 2)
    run_rae("train-diffusion", "--latents", root / "lat.zarr", "--out", root / "dit", *DIFFUSION_ARGS,
            "--snapshot-every", 2, "--checkpoint-every", 3, "--sample-every", 3, "--decoder", root / "dec")
    return root


def test_snapshots_are_the_ema_weights_of_their_steps_and_never_rotated(runs):
    dit = runs / "dit"
    assert saved_steps(dit) == {"snapshots": [2, 4, 6], "checkpoints": [3, 6]}
    final = load_weights(dit / "model_ema.safetensors")
    last = load_weights(snapshot_path(dit, 6))
    assert all(torch.equal(final[k], last[k]) for k in final)
    early = load_weights(snapshot_path(dit, 2))
    assert not all(torch.equal(final[k], early[k]) for k in final)
    assert saved_steps(runs / "dec")["snapshots"] == [2, 4, 6]
    # A step from a checkpoint (3): its EMA weights; a step kept nowhere: one line naming what there is.
    at3 = load_diffusion_run(dit, step=3)
    assert at3.content_id != read_manifest(dit)["content_id"]
    with pytest.raises(ArtifactError, match=r"no weights of step 5: snapshots at steps \[2, 4, 6\]"):
        load_diffusion_run(dit, step=5)
    decoder, info = load_decoder_run(runs / "dec", step=4)
    assert info["content_id"] != read_manifest(runs / "dec")["content_id"]


def test_sample_and_decode_at_a_step(runs, tmp_path):
    run_rae("sample", "--model", runs / "dit", "--out", tmp_path / "s6.zarr", *SAMPLE_ARGS, "--step", 6)
    run_rae("sample", "--model", runs / "dit", "--out", tmp_path / "final.zarr", *SAMPLE_ARGS)
    run_rae("sample", "--model", runs / "dit", "--out", tmp_path / "s2.zarr", *SAMPLE_ARGS, "--step", 2)
    lat = {k: np.asarray(LatentStore(tmp_path / f"{k}.zarr").latents[:]) for k in ("s6", "final", "s2")}
    assert np.array_equal(lat["s6"], lat["final"]) and not np.array_equal(lat["s2"], lat["final"])
    m = read_manifest(tmp_path / "s2.zarr")
    assert m["config"]["step"] == 2 and m["inputs"]["model"]["content_id"] != read_manifest(runs / "dit")["content_id"]
    run_rae("decode", tmp_path / "s2.zarr", "--decoder", runs / "dec", "--out", tmp_path / "img", "--step", 2,
            "--batch-size", 8)
    assert read_manifest(tmp_path / "img")["complete"]
    info = run_rae("info", runs / "dit").stdout
    assert "snapshots" in info and "2, 4, 6" in info


def test_a_run_still_training_samples_at_a_kept_step(runs, tmp_path):
    out = tmp_path / "dit"
    run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", out, *DIFFUSION_ARGS, "--snapshot-every", 2,
            "--stop-after", 4)
    proc = run_rae("sample", "--model", out, "--out", tmp_path / "no.zarr", *SAMPLE_ARGS, check=False)
    assert proc.returncode == 1 and "unfinished" in proc.stderr
    run_rae("sample", "--model", out, "--out", tmp_path / "s4.zarr", *SAMPLE_ARGS, "--step", 4)
    a = np.asarray(LatentStore(tmp_path / "s4.zarr").latents[:])
    run_rae("sample", "--model", runs / "dit", "--out", tmp_path / "ref4.zarr", *SAMPLE_ARGS, "--step", 4)
    assert np.array_equal(a, np.asarray(LatentStore(tmp_path / "ref4.zarr").latents[:]))  # the same training so far


def test_previews_are_decoded_grids_of_the_saved_samples(runs, tmp_path):
    from PIL import Image

    samples = runs / "dit" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_00000003.png", "step_00000003.safetensors",
                                                          "step_00000006.png", "step_00000006.safetensors"]
    grid = np.asarray(Image.open(samples / "step_00000006.png"))
    assert grid.shape == (64, 8 * 64, 3) and grid[:, :64].std() > 0  # 2 samples in a row of 8
    # The same grid from the saved latents, later, with rae decode.
    run_rae("decode", samples / "step_00000006.safetensors", "--decoder", runs / "dec", "--out", tmp_path / "g.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
    proc = run_rae("decode", samples / "step_00000006.safetensors", "--decoder", runs / "dec", "--out",
                   tmp_path / "g", check=False)
    assert proc.returncode == 1 and "must end in .png" in proc.stderr


def test_a_preview_decoder_for_other_latents_is_refused(runs, tmp_path):
    from tests.helpers import make_decoder_run

    other = make_decoder_run(tmp_path / "dec")  # for [8, 4, 4] latents of another encoder
    proc = run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", tmp_path / "dit", *DIFFUSION_ARGS,
                   "--decoder", other, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and str(other) in proc.stderr


def test_tensorboard_events_carry_the_log_and_the_grids(runs):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, image_tag, scalar in ((runs / "dit", "samples", "loss"), (runs / "dec", "reconstructions", "l1")):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = [(e.step, e.value) for e in events.Scalars(scalar)]
        assert logged == [(r["step"], pytest.approx(r[scalar])) for r in records]
        assert "data_wait" in events.Tags()["scalars"] and all(0 <= r["data_wait"] <= 1 for r in records)
        assert image_tag in events.Tags()["images"]


def test_wandb_without_the_package_is_one_line(runs, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", tmp_path / "dit", *DIFFUSION_ARGS,
                   "--wandb", "myproject", check=False)
    assert proc.returncode == 1 and "pip install wandb" in proc.stderr and not (tmp_path / "dit").exists()


def test_periodic_evaluation_is_recorded_and_does_not_change_training(runs, tmp_path):
    import json

    common = [*DIFFUSION_ARGS, "--decoder", runs / "dec", "--sample-every", 0, "--checkpoint-every", 3]
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", plain, *common)
    # FD in the RAE encoder's own space (no downloaded weights), against the training images.
    images = read_manifest(runs / "lat.zarr")["inputs"]["images"]["path"]
    evaluated = ["--eval-every", 3, "--eval-num", 12, "--eval-ref", images, "--eval-metrics", "fd_dinov2",
                 "--fd-encoder", runs / "lat.zarr", "--eval-batch-size", 5, "--eval-steps", 2]
    run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", scored, *common, *evaluated)
    for name in ("model_ema.safetensors", "model.safetensors"):
        a, b = load_weights(plain / name), load_weights(scored / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    records = [json.loads(line) for line in (scored / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fd_rae" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval/num"] == 12 and r["eval/fd_rae"] > 0 for r in evals)
    # Reproducible: a second run records the same numbers.
    again = tmp_path / "again"
    run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", again, *common, *evaluated)
    again_evals = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()
                   if "eval/fd_rae" in line]
    assert [r["eval/fd_rae"] for r in again_evals] == [r["eval/fd_rae"] for r in evals]
    proc = run_rae("train-diffusion", "--latents", runs / "lat.zarr", "--out", tmp_path / "x", *DIFFUSION_ARGS,
                   "--eval-every", 3, "--eval-ref", images, check=False)
    assert proc.returncode == 1 and "needs --decoder" in proc.stderr


def test_decoder_evaluation_on_held_out_data_is_recorded_and_does_not_change_training(runs, tmp_path):
    import json

    from safetensors.torch import load_file

    plain, scored = tmp_path / "plain", tmp_path / "scored"
    run_rae("train-decoder", "--latents", runs / "lat.zarr", "--out", plain, *DECODER_ARGS)
    run_rae("train-decoder", "--latents", runs / "lat.zarr", "--out", scored, *DECODER_ARGS, "--eval-every", 3,
            "--eval-data", runs / "lat.zarr", "--eval-num", 10, "--eval-metrics", "lpips")
    a, b = load_file(plain / "decoder_ema.safetensors"), load_file(scored / "decoder_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads(line) for line in (scored / "metrics.jsonl").read_text().splitlines() if "eval/psnr" in line]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval/num"] == 10 for r in evals)
    assert all(5 < r["eval/psnr"] < 60 and 0 < r["eval/ssim"] <= 1 and r["eval/lpips"] >= 0 for r in evals)
    proc = run_rae("train-decoder", "--latents", runs / "lat.zarr", "--out", tmp_path / "x", *DECODER_ARGS,
                   "--eval-every", 3, check=False)
    assert proc.returncode == 1 and "--eval-data" in proc.stderr


@pytest.mark.parametrize("stage", ["train-diffusion", "train-decoder"])
def test_stop_after_hours_checkpoints_at_a_log_step_and_the_same_command_goes_on(runs, tmp_path, stage):
    """A wall-time limit that is already over: the run stops at its first log step with a checkpoint
    and the resume line; run again without it, it ends with the weights of an uninterrupted run."""
    args = DIFFUSION_ARGS if stage == "train-diffusion" else DECODER_ARGS
    ema = "model_ema.safetensors" if stage == "train-diffusion" else "decoder_ema.safetensors"
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_rae(stage, "--latents", runs / "lat.zarr", "--out", full, *args)
    first = run_rae(stage, "--latents", runs / "lat.zarr", "--out", cut, *args, "--stop-after-hours", 1e-9)
    assert "stopped at step 1/6" in first.stderr + first.stdout
    assert not read_manifest(cut, require_complete=False)["complete"]
    run_rae(stage, "--latents", runs / "lat.zarr", "--out", cut, *args)
    a, b = load_weights(full / ema), load_weights(cut / ema)
    assert all(torch.equal(a[k], b[k]) for k in a)
