import os

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from stages.decode import DecodeConfig, run
from stages.models.decoder import to_uint8
from stages.errors import RaeError
from stages.artifacts.manifest import read_manifest
from stages.artifacts.runs import load_decoder_run
from stages.sample import SampleConfig
from stages.sample import run as sample_run
from stages.artifacts.store import LatentStore
from tests.helpers import ENCODER, make_decoder_run, make_diffusion_run



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    model = make_diffusion_run(root / "run")
    decoder = make_decoder_run(root / "decoder")
    store = root / "samples.zarr"
    sample_run(SampleConfig(model=str(model), out=str(store), per_class=3, steps=2, block_size=4, shard_size=4,
                            batch_size=4, device="cpu"))
    return model, decoder, store


def _cfg(store, decoder, out, **kw):
    return DecodeConfig(store=str(store), decoder=str(decoder), out=str(out), device="cpu", batch_size=4,
                        chunk_size=4, **kw)


def test_pngs_npz_and_grid_have_the_right_shapes(setup, tmp_path):
    model, decoder, store = setup
    out = tmp_path / "images"
    run(_cfg(store, decoder, out))
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs if p.name != "grid.png"] == [f"{i:06d}.png" for i in range(9)]
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (9, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert np.array_equal(z["arr_0"][4], np.asarray(Image.open(out / "000004.png")))
        arr = z["arr_0"]
    # The npz holds exactly what the decoder makes of the stored latents (clamp, x255, truncate).
    dec, _ = load_decoder_run(decoder)
    with torch.no_grad():
        expected = to_uint8(dec(torch.from_numpy(np.asarray(LatentStore(store).latents[:])).float()))
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= 1
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (3 * 16, 8 * 16, 3)  # one row per class, 8 slots per row
    assert np.array_equal(grid[16:32, 16:32], arr[4])  # row of class 1, second sample
    assert read_manifest(out, kind="image-folder")["num_images"] == 9


def test_uint8_conversion_truncates_like_the_reference():
    x = torch.tensor([-0.5, 0.0, 0.5, 0.999, 1.0, 1.7]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_decode_refuses_a_decoder_for_another_encoder(setup, tmp_path):
    model, decoder, store = setup
    other = make_decoder_run(tmp_path / "other", encoder={**ENCODER, "weights_sha256": "c" * 64})
    with pytest.raises(RaeError, match="another encoder weights"):
        run(_cfg(store, other, tmp_path / "x"))
    other_name = make_decoder_run(tmp_path / "other2", encoder={**ENCODER, "name": "siglip2-b"})
    with pytest.raises(RaeError, match="another encoder"):
        run(_cfg(store, other_name, tmp_path / "y"))


def test_resume_keeps_existing_pngs_and_gives_the_same_npz(setup, tmp_path, monkeypatch):
    model, decoder, store = setup
    full = tmp_path / "full"
    run(_cfg(store, decoder, full))
    out = tmp_path / "cut"
    import stages.decode as decode_mod

    original, written = decode_mod.write_png, []

    def dying(path, image):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(path.name)
        original(path, image)

    monkeypatch.setattr(decode_mod, "write_png", dying)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(store, decoder, out))
    assert not read_manifest(out, require_complete=False)["complete"] and not (out / "samples.npz").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png")}
    # `rae eval` refuses the unfinished folder; scores written for it before (an older rae) go away.
    from tests.helpers import run_rae

    proc = run_rae("eval", out, "--offline", "--metrics", "fid", check=False)
    assert proc.returncode == 1 and "unfinished" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (out / "eval.json").write_text("{}")
    # What kills mid-write leave: temporary files of a PNG and of the .npz; the finished run removes them.
    (out / ".000007.png.tmp4242").write_bytes(b"half a png")
    (out / ".samples.npz.tmp4242").write_bytes(b"half an npz")
    monkeypatch.setattr(decode_mod, "write_png", original)
    run(_cfg(store, decoder, out))
    assert not list(out.glob(".*tmp*")) and not (out / "eval.json").exists()
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # not redone
    with np.load(full / "samples.npz") as a, np.load(out / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_end_to_end_cli_sample_then_decode(tmp_path):
    from rae_cli.decode_cmd import report_decode
    from rae_cli.sample_cmd import report_sample

    app = typer.Typer()
    app.command("sample")(report_sample)
    app.command("decode")(report_decode)
    model = make_diffusion_run(tmp_path / "xl", seed=0)
    guide = make_diffusion_run(tmp_path / "s", seed=1, width=8, head_width=8)
    decoder = make_decoder_run(tmp_path / "decoder")
    cli = CliRunner()
    r = cli.invoke(app, ["sample", "--model", str(tmp_path / "xl"), "--out", str(tmp_path / "s.zarr"), "--number", "5",
                         "--guidance", "autoguidance", "--guide-model", str(guide), "--solver", "euler-ref",
                         "--steps", "3", "--guidance-interval", "0.1", "0.9", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "s.zarr", kind="sample-store")
    assert m["sampling"]["interval"] == [0.1, 0.9] and m["num_entries"] == 5
    r = cli.invoke(app, ["decode", str(tmp_path / "s.zarr"), "--decoder", str(decoder), "--out", str(tmp_path / "img"),
                         "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "img" / "samples.npz") as z:
        assert z["arr_0"].shape == (5, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    assert (tmp_path / "img" / "grid.png").is_file()
    # A user mistake is one line, no traceback.
    other = make_decoder_run(tmp_path / "other", encoder={**ENCODER, "weights_sha256": "d" * 64})
    r = cli.invoke(app, ["decode", str(tmp_path / "s.zarr"), "--decoder", str(other), "--out", str(tmp_path / "x"),
                         "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert model.exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(setup, tmp_path, monkeypatch):
    """The disk fills while PNGs are written: one line saying so (not PIL's internal error), no
    temporary file left, and the same command finishes once there is space."""
    import errno

    from tests.helpers import run_rae

    model, decoder, store = setup
    real_replace, calls = os.replace, {"n": 0}

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith(".png"):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    out = tmp_path / "img"
    proc = run_rae("decode", store, "--decoder", decoder, "--out", out, "--device", "cpu", check=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left") and "run the same command again" in lines[0]
    assert not list(out.glob(".*tmp*")) and not read_manifest(out, require_complete=False)["complete"]
    run_rae("decode", store, "--decoder", decoder, "--out", out, "--device", "cpu")
    assert read_manifest(out)["complete"]


def test_out_that_is_a_file_is_one_line(setup, tmp_path):
    from tests.helpers import run_rae

    model, decoder, store = setup
    (tmp_path / "taken").write_text("a file")
    for argv in (["decode", store, "--decoder", decoder], ["sample", "--model", model, "--number", "2"]):
        proc = run_rae(*argv, "--out", tmp_path / "taken", "--device", "cpu", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "taken" in lines[0], proc.stderr
    assert (tmp_path / "taken").read_text() == "a file"
