"""stages.artifacts.store, the latent store (written here by `rae encode` on the demo images): exact
statistics and their merging, reads, damaged shards, the shard codecs and entry checksums, and the
end of a store (statistics, flag, manifest, block records) killed at each write."""
import numpy as np
import pytest
import torch

from stages.encode import run
from stages.errors import ArtifactError
from stages.artifacts.images import center_crop_arr, load_rgb
from stages.models.encoders import build_encoder
from stages.artifacts.manifest import read_manifest
from stages.artifacts.store import LatentStore, Moments
from tests.helpers import encode_config, run_rae, store_arrays


def test_store_round_trip_and_exact_statistics(demo_images, tmp_path):
    out = tmp_path / "s.zarr"
    run(encode_config(demo_images, out, flip=True))
    manifest = read_manifest(out, kind="latent-store")
    a = store_arrays(out)
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


@pytest.fixture(scope="module")
def finished_store(demo_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "s.zarr"
    run(encode_config(demo_images, out))  # 40 entries in shards of 8
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

    import stages.artifacts.store as store_mod

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


@pytest.mark.parametrize("stop_at", ["finalize_statistics", "remove_temporaries", "mark_complete",
                                     "write_manifest", "drop_block_records"])
def test_a_kill_at_every_step_of_the_end_resumes_to_the_same_store(finished_store, demo_images, tmp_path,
                                                                    monkeypatch, stop_at):
    """The end of encode is several writes (statistics, temporaries, the store's flag, the manifest,
    the block records). Killed before each, the same command finishes the store, equal to an
    uninterrupted one; the manifest is the commit point."""
    import stages.artifacts.store as store_mod
    from stages.artifacts.store import LatentStore as Store

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
        run(encode_config(demo_images, out))
    monkeypatch.setattr(owner, stop_at, original)
    assert not read_manifest(out, require_complete=False)["complete"] or stop_at == "drop_block_records"
    run(encode_config(demo_images, out))
    a, b = store_arrays(finished_store), store_arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert read_manifest(out)["content_id"] == read_manifest(finished_store)["content_id"]
    assert not (out / ".blocks").exists() and not list(out.rglob(".*tmp*"))
