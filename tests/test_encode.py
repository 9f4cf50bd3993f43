"""`rae encode`, the stage: resume, refusals, bad inputs, the command line and the crops made on the
device; the latent store it writes is tested in tests/artifacts/test_store.py."""
import json

import numpy as np
import pytest
from PIL import Image

from stages.encode import run
from stages.errors import ArtifactError
from stages.artifacts.manifest import read_manifest
from stages.artifacts.store import LatentStore
from tests.helpers import encode_config, run_rae, store_arrays


def test_resume_after_crash_equals_uninterrupted_run(demo_images, tmp_path, monkeypatch):
    full = tmp_path / "full.zarr"
    run(encode_config(demo_images, full, flip=True))
    out = tmp_path / "resumed.zarr"
    real_write = LatentStore.write_block
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, *a, **k)

    monkeypatch.setattr(LatentStore, "write_block", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(encode_config(demo_images, out, flip=True))
    monkeypatch.setattr(LatentStore, "write_block", real_write)
    # Interrupted: not complete, and a downstream stage refuses it.
    assert not read_manifest(out, require_complete=False)["complete"]
    with pytest.raises(ArtifactError, match="unfinished"):
        read_manifest(out, kind="latent-store")
    done_before = 5 - len(LatentStore(out).pending_blocks())
    assert 1 <= done_before < 5
    written = []
    shard_dir = out / "latents" / "c" / "0" / "0" / "0"
    (shard_dir / ".0.tmp4242.140000").write_bytes(b"a shard cut short")  # a writer killed mid-write
    monkeypatch.setattr(LatentStore, "write_block", lambda self, b, *a, **k: (written.append(b), real_write(self, b, *a, **k)))
    run(encode_config(demo_images, out, flip=True, batch_size=5))  # run settings may change on resume
    assert not list(out.rglob(".*tmp*"))  # the finished store keeps no temporary file
    assert len(written) == 5 - done_before  # finished blocks are not recomputed
    a, b = store_arrays(full), store_arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_changed_configuration_is_refused_unless_overwrite(demo_images, tmp_path):
    out = tmp_path / "s.zarr"
    run(encode_config(demo_images, out))
    with pytest.raises(ArtifactError, match="--overwrite"):
        run(encode_config(demo_images, out, flip=True))
    run(encode_config(demo_images, out, flip=True, overwrite=True))
    assert read_manifest(out)["num_entries"] == 80
    # A complete store with the same configuration is reused as it is.
    res = run(encode_config(demo_images, out, flip=True))
    assert res["entries"] == 80
    # Never delete something that is not a rae artifact.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    with pytest.raises(ArtifactError):
        run(encode_config(demo_images, other, overwrite=True))
    assert (other / "thesis.tex").exists()


def test_bad_inputs_are_skipped_listed_and_excluded(tmp_path):
    data = tmp_path / "data"
    good, bad = data / "good", data / "weird"
    good.mkdir(parents=True)
    bad.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(good / f"{i}.png")
    Image.new("CMYK", (70, 70), (0, 200, 200, 0)).save(bad / "cmyk.jpg")
    Image.new("L", (70, 70), 90).save(bad / "gray.png")
    Image.fromarray(np.full((70, 70), 40000, np.uint16)).save(bad / "sixteen.png")
    Image.new("RGBA", (70, 70), (1, 2, 3, 0)).save(bad / "alpha.png")
    Image.new("P", (70, 70), 5).save(bad / "palette.png")
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("hello")
    (bad / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.new("RGB", (300, 300), (5, 5, 5)).save(bad / "trunc.jpg", quality=90)
    raw = (bad / "trunc.jpg").read_bytes()
    (bad / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    Image.new("RGB", (6, 6)).save(bad / "tiny.png")
    out = tmp_path / "s.zarr"
    res = run(encode_config(data, out))
    skipped = {p.split("/")[-1] for p, _ in res["skipped"]}
    assert skipped == {"zero.jpg", "notes.txt", "corrupt.jpg", "trunc.jpg", "tiny.png"}
    manifest = read_manifest(out)
    assert manifest["num_valid"] == 8 and len(manifest["skipped_files"]) == 5
    a = store_arrays(out)
    files = (out / "sources.txt").read_text().split()
    valid_files = {files[s].split("/")[-1] for s, v in zip(a["source"], a["valid"]) if v}
    assert "cmyk.jpg" in valid_files and "sixteen.png" in valid_files and "zero.jpg" not in valid_files
    x = a["latents"][a["valid"]].astype(np.float64)  # statistics ignore the skipped entries
    # float32 copy of a float64 mean of the same 8 values (see test_store_round_trip_and_exact_statistics in
    # tests/artifacts/test_store.py):
    # one float32 ulp; counting a skipped (zero) entry would move it by 1/9 of the mean.
    np.testing.assert_allclose(a["mean"], x.mean(0).astype(np.float32), rtol=2.5e-7, atol=8 * 2.0 ** -53 * np.abs(x).max())


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    missing = run_rae("encode", tmp_path / "nope", "--out", tmp_path / "o.zarr", "--preset", "demo", check=False)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_rae("encode", tmp_path / "empty", "--out", tmp_path / "o.zarr", "--preset", "demo", check=False)
    assert empty.returncode == 1 and "no files" in empty.stderr and "Traceback" not in empty.stderr
    assert not (tmp_path / "o.zarr").exists()  # nothing half-written


def test_info_describes_a_store(demo_images, tmp_path):
    out = tmp_path / "s.zarr"
    run(encode_config(demo_images, out))
    text = run_rae("info", out).stdout
    assert "latent-store" in text and "[96, 4, 4]" in text and "dinov2-demo" in text
    manifest = json.loads(run_rae("info", out, "--json").stdout)
    assert manifest["complete"] and manifest["config"]["encoder"] == "dinov2-demo"


def test_resize_on_device_gives_the_same_store_bit_for_bit(tmp_path):
    """The GPU half of the crop (run here on the CPU: same code) equals Pillow's crop exactly: mixed
    image sizes in one batch, upscaled small images, images already S x S, a very tall one (Pillow 13
    resizes it vertically first), one above the box-halving threshold and a bad file; batches built in
    DataLoader workers (shared memory) as well as in the main process."""
    data = tmp_path / "data" / "c"
    data.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sizes = [(90, 70), (70, 90), (64, 64), (200, 130), (40, 33), (90, 70), (100, 300), (300, 140), (129, 133)]
    for i, (w, h) in enumerate(sizes):
        low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not an image")
    run(encode_config(data.parent, tmp_path / "cpu.zarr", resize="auto", batch_size=4))  # auto is cpu on a CPU device
    assert read_manifest(tmp_path / "cpu.zarr")["config"]["resize"] == "cpu"
    run(encode_config(data.parent, tmp_path / "dev.zarr", resize="gpu", batch_size=4))
    run(encode_config(data.parent, tmp_path / "dev2.zarr", resize="gpu", batch_size=4, num_workers=2))
    a = store_arrays(tmp_path / "cpu.zarr")
    assert (~a["valid"]).sum() == 1
    for other in ("dev.zarr", "dev2.zarr"):
        b = store_arrays(tmp_path / other)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{other}: {k}")


def test_chunked_batches_in_workers_with_buffer_overflow_equal_pillow_in_process(tmp_path, monkeypatch):
    """Batches of 40 images load as three chunks in worker processes (chunks of 16 here: a size); with
    loading buffers made smaller (2.5 S^2 per image instead of 4.2) the large windows overflow them,
    so workers finish those crops with Pillow. The store equals the in-process Pillow run bit for bit,
    with --flip."""
    import stages.encode as enc

    monkeypatch.setattr(enc, "chunk_images", lambda s: 16)
    monkeypatch.setattr(enc, "chunk_bytes", lambda s: enc.chunk_images(s) * int(2.5 * s * s) * 3)
    data = tmp_path / "data" / "c"
    data.mkdir(parents=True)
    rng = np.random.default_rng(2)
    sizes = [(300, 127), (127, 300)] + [(int(w), int(h)) for w, h in rng.integers(50, 140, (46, 2))]
    for i, (w, h) in enumerate(sizes):
        low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(data / f"{i:02d}.png")
    kw = dict(batch_size=80, block_size=64, shard_size=8, flip=True)
    run(encode_config(data.parent, tmp_path / "ref.zarr", resize="cpu", **kw))
    run(encode_config(data.parent, tmp_path / "chunks.zarr", resize="gpu", num_workers=2, **kw))
    a, b = store_arrays(tmp_path / "ref.zarr"), store_arrays(tmp_path / "chunks.zarr")
    assert a["valid"].all() and len(a["latents"]) == 2 * len(sizes)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_folder_without_one_readable_image_writes_nothing(tmp_path):
    (tmp_path / "data" / "c").mkdir(parents=True)
    (tmp_path / "data" / "c" / "a.png").write_bytes(b"not an image")
    (tmp_path / "data" / "c" / "b.jpg").write_bytes(b"")
    for attempt in range(2):  # the same answer again: no store that looks interrupted in between
        proc = run_rae("encode", tmp_path / "data", "--out", tmp_path / "s.zarr", "--preset", "demo",
                       "--num-workers", "0", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "no readable image" in error[0] and "all 2 files were skipped" in error[0]
        assert not (tmp_path / "s.zarr").exists()


def test_a_kill_while_the_store_is_created_leaves_nothing_a_rerun_refuses(demo_images, tmp_path, monkeypatch):
    """The store is built under a staging name and renamed into place with its manifest: killed
    before (here: at the manifest write), there is no half-made `--out`, the interrupted run removed
    its staging folder and gave back the output's lock, and the same command works. (A SIGKILL leaves
    the staging folder: the next run removes it, test_nothing_lost.)"""
    from stages.artifacts.outputs import lock_path

    import stages.encode as encode_mod

    original = encode_mod.write_manifest

    def killed(folder, manifest):
        raise KeyboardInterrupt("killed while creating the store")

    out = tmp_path / "x.zarr"
    monkeypatch.setattr(encode_mod, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run(encode_config(demo_images, out, flip=True))
    monkeypatch.setattr(encode_mod, "write_manifest", original)
    assert not out.exists() and not list(tmp_path.glob(".x.zarr.*"))  # neither staging folder nor lock
    assert not lock_path(out).exists()
    run(encode_config(demo_images, out, flip=True))
    assert read_manifest(out)["complete"] and not list(tmp_path.glob(".x.zarr.creating*"))


def test_any_timm_vit_encodes_and_its_decoder_trains(demo_images, tmp_path):
    """`--encoder timm:MODEL_NAME` (DINOv3-S/16 here, random weights): the grid from the image size, the
    model's own normalisation recorded, and a decoder of the right geometry trains on the store."""
    from tests.helpers import DECODER_ARGS, ENCODE_ARGS

    store = tmp_path / "s.zarr"
    run_rae("encode", demo_images, "--out", store, *ENCODE_ARGS, "--encoder", "timm:vit_small_patch16_dinov3",
            "--random-init")
    enc = read_manifest(store)["encoder"]
    assert enc["latent_shape"] == [384, 4, 4] and enc["patch_size"] == 16 and enc["input_size"] == 64
    assert enc["timm_name"] == "vit_small_patch16_dinov3.lvd1689m" and enc["name"] == "timm:vit_small_patch16_dinov3"
    assert LatentStore(store).latents.shape[1:] == (384, 4, 4)
    argv = ["train-decoder", "--latents", store, *DECODER_ARGS, "--steps", 2]
    proc = run_rae(*argv, "--out", tmp_path / "bad", "--decoder-patch", 8, "--augment", "reference", check=False)
    assert proc.returncode == 1 and "--decoder-patch 16 for 64 px images from its 4x4 tokens" in proc.stderr
    run_rae(*argv, "--out", tmp_path / "dec")
    assert json.loads((tmp_path / "dec" / "config.json").read_text())["encoder"]["name"] == enc["name"]
