import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.encode import EncodeConfig, run
from stages.errors import ArtifactError
from stages.images import center_crop_arr, load_rgb
from stages.encoders import build_encoder
from stages.manifest import read_manifest
from stages.store import LatentStore, Moments
from tests.conftest import run_rae


def _cfg(data, out, **kw):
    base = dict(encoder="dinov2-demo", random_init=True, image_size=64, block_size=16, shard_size=8,
                batch_size=8, num_workers=0, device="cpu")
    base.update(kw)
    return EncodeConfig(data=str(data), out=str(out), **base)


def _arrays(path):
    s = LatentStore(path)
    mean, var = s.statistics()
    return {"latents": np.asarray(s.latents[:]), "labels": np.asarray(s.labels[:]), "valid": np.asarray(s.valid[:]),
            "flipped": np.asarray(s.flipped[:]), "source": np.asarray(s.source_index[:]), "mean": mean, "var": var}


def test_store_round_trip_and_exact_statistics(demo_images, tmp_path):
    out = tmp_path / "s.zarr"
    run(_cfg(demo_images, out, flip=True))
    manifest = read_manifest(out, kind="latent-store")
    a = _arrays(out)
    assert manifest["num_entries"] == 80 and a["latents"].shape == (80, 96, 4, 4)
    assert a["latents"].dtype == np.float16 and a["valid"].all()
    assert list(a["flipped"][:4]) == [False, True, False, True] and list(a["source"][:4]) == [0, 0, 1, 1]
    assert sorted(set(a["labels"].tolist())) == list(range(10))
    # Statistics equal numpy float64 on the stored data. Error model: both are float64 sums of the same
    # n = 80 values in another order, at most n u max|x| apart (u = 2^-53); the variance's terms are
    # squares (scale max|x|^2). The stored float32 copies are those values rounded: at most one float32
    # ulp (2^-23 = 1.2e-7 relative) apart. A wrong entry (one latent of 80 missed or counted twice)
    # moves them by ~1e-2.
    x = a["latents"].astype(np.float64)
    err = 80 * 2.0 ** -53 * np.abs(x).max()
    np.testing.assert_allclose(a["mean"], x.mean(0).astype(np.float32), rtol=2.5e-7, atol=err)
    np.testing.assert_allclose(a["var"], x.var(0).astype(np.float32), rtol=2.5e-7, atol=err * np.abs(x).max())
    with np.load(out / "statistics_float64.npz") as f64:
        np.testing.assert_allclose(f64["mean"], x.mean(0), rtol=0, atol=err)
        np.testing.assert_allclose(f64["var"], x.var(0), rtol=0, atol=4 * err * np.abs(x).max())
    # Round trip: the stored latent of entry 3 is the encoder's output on the mirrored crop of image 1.
    enc, _ = build_encoder("dinov2-demo", 64, pretrained=False, seed=0)
    files = (out / "sources.txt").read_text().split()
    crop = torch.from_numpy(center_crop_arr(load_rgb(demo_images / files[1]), 64)).permute(2, 0, 1)[None]
    expected = enc(crop.flip(-1)).half().numpy()[0]
    np.testing.assert_array_equal(a["latents"][3], expected)
    # Random reads in any order return the right entries.
    s = LatentStore(out)
    np.testing.assert_array_equal(s.read([5, 2, 77]), a["latents"][[5, 2, 77]])


def test_moments_merge_is_exact_in_any_grouping():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 3)) * 5 + 2
    m = Moments.of(x[:10]).merge(Moments.of(x[10:55])).merge(Moments.of(x[55:]))
    # float64 (u = 2^-53) sums of 100 terms |x| < 25 in another grouping: at most 100 u 25 = 3e-13 apart
    # for the mean, 100 u 25^2 = 7e-12 for the variance (~25); a wrong merge formula is off by > 1e-2.
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=0, atol=3e-13)
    np.testing.assert_allclose(m.var, x.var(0), rtol=0, atol=7e-12)


def test_resume_after_crash_equals_uninterrupted_run(demo_images, tmp_path, monkeypatch):
    full = tmp_path / "full.zarr"
    run(_cfg(demo_images, full, flip=True))
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
        run(_cfg(demo_images, out, flip=True))
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
    run(_cfg(demo_images, out, flip=True, batch_size=5))  # run settings may change on resume
    assert not list(out.rglob(".*tmp*"))  # the finished store keeps no temporary file
    assert len(written) == 5 - done_before  # finished blocks are not recomputed
    a, b = _arrays(full), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_changed_configuration_is_refused_unless_overwrite(demo_images, tmp_path):
    out = tmp_path / "s.zarr"
    run(_cfg(demo_images, out))
    with pytest.raises(ArtifactError, match="--overwrite"):
        run(_cfg(demo_images, out, flip=True))
    run(_cfg(demo_images, out, flip=True, overwrite=True))
    assert read_manifest(out)["num_entries"] == 80
    # A complete store with the same configuration is reused as it is.
    res = run(_cfg(demo_images, out, flip=True))
    assert res["entries"] == 80
    # Never delete something that is not a rae artifact.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    with pytest.raises(ArtifactError):
        run(_cfg(demo_images, other, overwrite=True))
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
    res = run(_cfg(data, out))
    skipped = {p.split("/")[-1] for p, _ in res["skipped"]}
    assert skipped == {"zero.jpg", "notes.txt", "corrupt.jpg", "trunc.jpg", "tiny.png"}
    manifest = read_manifest(out)
    assert manifest["num_valid"] == 8 and len(manifest["skipped_files"]) == 5
    a = _arrays(out)
    files = (out / "sources.txt").read_text().split()
    valid_files = {files[s].split("/")[-1] for s, v in zip(a["source"], a["valid"]) if v}
    assert "cmyk.jpg" in valid_files and "sixteen.png" in valid_files and "zero.jpg" not in valid_files
    x = a["latents"][a["valid"]].astype(np.float64)  # statistics ignore the skipped entries
    # float32 copy of a float64 mean of the same 8 values (see test_store_round_trip_and_exact_statistics):
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
    run(_cfg(demo_images, out))
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
    run(_cfg(data.parent, tmp_path / "cpu.zarr", resize="auto", batch_size=4))  # auto is cpu on a CPU device
    assert read_manifest(tmp_path / "cpu.zarr")["config"]["resize"] == "cpu"
    run(_cfg(data.parent, tmp_path / "dev.zarr", resize="gpu", batch_size=4))
    run(_cfg(data.parent, tmp_path / "dev2.zarr", resize="gpu", batch_size=4, num_workers=2))
    a = _arrays(tmp_path / "cpu.zarr")
    assert (~a["valid"]).sum() == 1
    for other in ("dev.zarr", "dev2.zarr"):
        b = _arrays(tmp_path / other)
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
    run(_cfg(data.parent, tmp_path / "ref.zarr", resize="cpu", **kw))
    run(_cfg(data.parent, tmp_path / "chunks.zarr", resize="gpu", num_workers=2, **kw))
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "chunks.zarr")
    assert a["valid"].all() and len(a["latents"]) == 2 * len(sizes)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def finished_store(demo_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "s.zarr"
    run(_cfg(demo_images, out))  # 40 entries in shards of 8
    return out


@pytest.mark.parametrize("damage", ["missing", "random bytes", "truncated", "index bytes flipped",
                                    "entry bytes flipped"])
def test_a_damaged_shard_is_a_one_line_error_naming_it(finished_store, tmp_path, damage):
    """Readers of a finished store never read zeros for a lost shard, nor a codec's traceback for a
    damaged one: one line naming the file and what to do. Through the command line as well, with
    the training loader's worker processes between the file and the message."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(finished_store, store)
    shard = store / "latents" / "c" / "3" / "0" / "0" / "0"  # entries 24-31
    raw = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    elif damage == "random bytes":
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif damage == "truncated":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "index bytes flipped":  # 40 of them (the index has its own checksum)
        data = bytearray(raw)
        for pos in np.random.default_rng(1).choice(np.arange(len(raw) - 8 * 16 - 4, len(raw) - 4), 40, replace=False):
            data[pos] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:  # one bit in the middle of entry 26's compressed bytes: Blosc decodes it without noticing
        data = bytearray(raw)
        offset, nbytes = np.frombuffer(raw[-8 * 16 - 4: -4], dtype="<u8").reshape(8, 2)[2]
        data[int(offset + nbytes // 2)] ^= 0x01
        shard.write_bytes(bytes(data))
    s = LatentStore(store)
    np.testing.assert_array_equal(s.read(np.arange(24)), LatentStore(finished_store).read(np.arange(24)))  # others fine
    with pytest.raises(ArtifactError) as info:
        s.read(np.arange(40))
    message = str(info.value)
    assert "\n" not in message and str(shard) in message and "--overwrite" in message
    if damage == "missing":
        proc = run_rae("train-diffusion", "--latents", store, "--out", tmp_path / "run", "--model", "ditdh-s",
                       "--width", 32, "--depth", 1, "--num-heads", 2, "--head-width", 96, "--head-depth", 1,
                       "--head-num-heads", 4, "--batch-size", 40, "--steps", 1, "--num-workers", 1,
                       "--sample-every", 0, "--device", "cpu", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and str(shard) in " ".join(proc.stderr.split()), proc.stderr


@pytest.mark.parametrize("codec", ["blosc-zstd", "blosc-lz4", "none", "before entry checksums"])
def test_shard_reads_and_writes_agree_with_zarr(tmp_path, monkeypatch, codec):
    """The direct shard path and Zarr read each other's files, with every codec; stores written before
    entries carried a CRC32C (Blosc alone after ``bytes``) are still read by the direct path."""
    import zarr.codecs as zc

    import stages.store as store_mod

    latents = np.random.default_rng(0).standard_normal((20, 3, 2, 2)).astype(np.float16)
    n = len(latents)
    zeros = np.zeros(n, dtype=np.int64)
    if codec == "before entry checksums":
        old = [zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2, blocksize=24)]
        monkeypatch.setattr(store_mod, "make_codec", lambda *a, **k: old)
    s = LatentStore.create(tmp_path / "s.zarr", n, (3, 2, 2), "float16", zeros, zeros, zeros.astype(bool), {},
                           shard_size=4, block_size=8, codec="blosc-zstd" if codec == "before entry checksums" else codec)
    assert s.shards is not None and s.shards.entry_crc == (codec != "before entry checksums")
    s.latents[:8] = latents[:8]  # written by Zarr, read directly
    for shard in range(2, 5):  # written directly, read by Zarr
        s.shards.write_shard(shard, latents[shard * 4: shard * 4 + 4])
    np.testing.assert_array_equal(s.read(np.arange(n)[::-1]), latents[::-1])
    np.testing.assert_array_equal(np.asarray(LatentStore(tmp_path / "s.zarr").latents[:]), latents)


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


@pytest.mark.parametrize("stop_at", ["finalize_statistics", "remove_temporaries", "mark_complete",
                                     "write_manifest", "drop_block_records"])
def test_a_kill_at_every_step_of_the_end_resumes_to_the_same_store(finished_store, demo_images, tmp_path,
                                                                    monkeypatch, stop_at):
    """The end of encode is several writes (statistics, temporaries, the store's flag, the manifest,
    the block records). Killed before each, the same command finishes the store, equal to an
    uninterrupted one; the manifest is the commit point."""
    import stages.store as store_mod
    from stages.store import LatentStore as Store

    # LatentStore.finish makes these writes, in this order.
    owner = {"finalize_statistics": Store, "mark_complete": Store, "drop_block_records": Store}.get(stop_at, store_mod)
    original = getattr(owner, stop_at)

    def killed(*a, **k):
        if stop_at == "write_manifest" and not (len(a) > 1 and a[1].get("complete")):
            return original(*a, **k)  # only the final manifest write
        raise KeyboardInterrupt(f"killed at {stop_at}")

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(owner, stop_at, killed)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(demo_images, out))
    monkeypatch.setattr(owner, stop_at, original)
    assert not read_manifest(out, require_complete=False)["complete"] or stop_at == "drop_block_records"
    run(_cfg(demo_images, out))
    a, b = _arrays(finished_store), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert read_manifest(out)["content_id"] == read_manifest(finished_store)["content_id"]
    assert not (out / ".blocks").exists() and not list(out.rglob(".*tmp*"))


def test_a_kill_while_the_store_is_created_leaves_nothing_a_rerun_refuses(demo_images, tmp_path, monkeypatch):
    """The store is built under a staging name and renamed into place with its manifest: killed
    before (here: at the manifest write), there is no half-made `--out`, the interrupted run removed
    its staging folder and gave back the output's lock, and the same command works. (A SIGKILL leaves
    the staging folder: the next run removes it, test_nothing_lost.)"""
    from stages.outputs import lock_path

    import stages.encode as encode_mod

    original = encode_mod.write_manifest

    def killed(folder, manifest):
        raise KeyboardInterrupt("killed while creating the store")

    out = tmp_path / "x.zarr"
    monkeypatch.setattr(encode_mod, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(demo_images, out, flip=True))
    monkeypatch.setattr(encode_mod, "write_manifest", original)
    assert not out.exists() and not list(tmp_path.glob(".x.zarr.*"))  # neither staging folder nor lock
    assert not lock_path(out).exists()
    run(_cfg(demo_images, out, flip=True))
    assert read_manifest(out)["complete"] and not list(tmp_path.glob(".x.zarr.creating*"))
