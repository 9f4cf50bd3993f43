"""`rae eval --model RUN --decoder DEC`: samples made, decoded and scored in memory give the numbers of
`rae sample` -> `rae decode` -> `rae eval` on the same seeds; a comma list of scales scores each."""
import json

import numpy as np
import pytest

from tests.helpers import make_decoder_run, make_diffusion_run, run_rae

METRICS = ["--metrics", "fid,sfid,is,kid,pr"]
SAMPLING = ["--per-class", 4, "--steps", 3, "--guidance", "autoguidance"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("from_model")
    make_diffusion_run(root / "dit", seed=0)
    make_diffusion_run(root / "guide", seed=1)
    make_decoder_run(root / "dec")
    rng = np.random.default_rng(0)
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8))
    return root


def _files_chain(root, tmp_path, scale: str) -> dict:
    run_rae("sample", "--model", root / "dit", "--out", tmp_path / "s.zarr", *SAMPLING, "--guide-model", root / "guide",
            "--ag-scale", scale, "--batch-size", 6, "--device", "cpu")
    run_rae("decode", tmp_path / "s.zarr", "--decoder", root / "dec", "--out", tmp_path / "img", "--batch-size", 6,
            "--device", "cpu")
    run_rae("eval", tmp_path / "img" / "samples.npz", "--ref", root / "ref.npz", *METRICS, "--batch-size", 5,
            "--device", "cpu", "--out", tmp_path / "files.json")
    return json.loads((tmp_path / "files.json").read_text())


def test_scores_from_a_model_equal_those_of_the_files_and_a_sweep_scores_each_scale(models, torch_home, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    files = _files_chain(models, tmp_path, "1.5")
    proc = run_rae("eval", "--model", models / "dit", "--decoder", models / "dec", *SAMPLING, "--guide-model",
                   models / "guide", "--ag-scale", "1.5,3", "--sample-batch-size", 6, "--ref", models / "ref.npz",
                   *METRICS, "--batch-size", 5, "--device", "cpu", "--out", tmp_path / "sweep.json")
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["kind"] == "eval-sweep" and sweep["swept"] == "--ag-scale" and sweep["scales"] == [1.5, 3.0]
    first, second = sweep["results"]
    assert set(first["metrics"]) == set(files["metrics"]) >= {"fid", "sfid", "is", "kid", "precision", "recall"}
    for key, value in files["metrics"].items():
        assert first["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert second["metrics"]["fid"] != first["metrics"]["fid"]
    # What was scored is recorded: the runs by content id, the sampling, the labels and seeds.
    images = first["images"]
    assert images["model"]["content_id"] == "run-0" and images["guide"]["content_id"] == "run-1"
    assert images["decoder"]["content_id"] == "dec-0" and images["labels"] == {"per_class": 4}
    assert images["sampling"]["scale"] == 1.5 and images["sampling"]["guidance"] == "autoguidance"
    assert images["seeds"] == [0, 11] and first["num_images"] == 12
    # One table, a column per scale; nothing written but eval.json.
    out = proc.stdout + proc.stderr
    assert "--ag-scale 1.5" in out and "--ag-scale 3" in out and "FID" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files.json", "img", "s.zarr", "sweep.json"]


def test_two_processes_score_as_one(models, torch_home, tmp_path, monkeypatch):
    """Batches of 3 on 1 or 2 processes: every image goes through the networks in the same batch, so
    only the order of the float64 sums over ranks differs."""
    args = ["eval", "--model", models / "dit", "--decoder", models / "dec", "--per-class", 3, "--steps", 2,
            "--sample-batch-size", 3, "--batch-size", 3, "--ref", models / "ref.npz", "--metrics", "fid,is,kid",
            "--device", "cpu"]
    env = {"TORCH_HOME": str(torch_home)}
    run_rae(*args, "--out", tmp_path / "one.json", env=env)
    run_rae(*args, "--out", tmp_path / "two.json", env=env, nproc=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["config"]["precision"] == one["config"]["precision"] == "fp32"
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-9), key


def test_bad_uses_are_one_line(models, tmp_path):
    other = make_decoder_run(tmp_path / "other_dec", encoder={"name": "siglip2-b", "weights_sha256": "b" * 64,
                                                              "latent_shape": [8, 4, 4], "pretrained": False})
    base = ["eval", "--model", models / "dit", "--per-class", 2, "--device", "cpu"]
    cases = [
        (base, "--model needs --decoder"),
        ([*base, "--decoder", models / "dec", models / "ref.npz"], "not both"),
        ([*base, "--decoder", models / "dec", "--pairs", "--ref", models / "ref.npz"], "--pairs is for image files"),
        ([*base, "--decoder", models / "dec", "--cfg-scale", "1,2"], "--cfg-scale lists several scales"),
        ([*base, "--decoder", models / "dec", "--ag-scale", "1,x"], "not a comma-separated list of numbers"),
        ([*base, "--decoder", other], "trained for another encoder"),
        ([*base, "--decoder", models / "dec", "--out", models / "dit" / "eval.json"], "inside"),
        (["eval", "--device", "cpu"], "--model RUN --decoder DEC"),
        (["eval", models / "ref.npz", "--decoder", models / "dec"], "--decoder is used with --model"),
    ]
    for argv, message in cases:
        proc = run_rae(*argv, check=False)
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (models / "dit" / "eval.json").exists()
