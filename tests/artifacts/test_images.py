import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.errors import ArtifactError, RaeError
from stages.artifacts.images import (BadImage, SourceChanged, center_crop_arr, check_sources, list_images, load_rgb,
                                     walk_files)


def test_adm_crop_box_halves_large_images_then_bicubic_then_centre():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8))
    out = center_crop_arr(img, 256)
    # 512 >= 2*256: one box halving to 384x256, then the bicubic resize is the identity scale.
    half = np.asarray(img.resize((384, 256), resample=Image.BOX))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out, half[:, 64:320])


def test_adm_crop_upsamples_small_images_and_keeps_centre():
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    img.paste((200, 0, 0), (45, 20, 55, 30))  # a red square in the middle
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 32]) == (200, 0, 0) and tuple(out[2, 2]) == (10, 20, 30)


def test_list_imagenet_layout_sorted_classes_and_limit_spreads(tmp_path):
    for cls in ("b_cls", "a_cls"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 20)).save(tmp_path / cls / f"{i}.png")
    listing = list_images(tmp_path)
    assert listing.class_names == ["a_cls", "b_cls"]
    assert listing.labels == [0] * 5 + [1] * 5
    sub = list_images(tmp_path, limit=4)
    assert len(sub.files) == 4 and set(sub.labels) == {0, 1}


def test_list_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20)).save(tmp_path / f"{i}.png")
    listing = list_images(tmp_path)
    assert listing.class_names == [] and listing.labels == [-1, -1, -1]


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_missing_or_empty_input_is_one_line_error(tmp_path, make):
    path = tmp_path / "data"
    if make == "empty":
        path.mkdir()
    if make == "file":
        path.write_text("x")
    with pytest.raises(RaeError) as e:
        list_images(path)
    assert "\n" not in str(e.value)


def test_modes_convert_to_rgb(tmp_path):
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "g16.png")
    Image.new("LA", (20, 20), (128, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (20, 20), 3)
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png")
    for name in ("cmyk.jpg", "g16.png", "la.png", "pal.png"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (20, 20)
    assert np.asarray(load_rgb(tmp_path / "g16.png")).min() == 255  # rescaled, not clipped to 255 by accident
    assert tuple(np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[5, 5])[0] > 200  # CMYK red stays red


def test_bad_files_raise_bad_image(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (200, 200), (1, 2, 3)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    for name in ("zero.jpg", "text.jpg", "trunc.jpg", "tiny.png"):
        with pytest.raises(BadImage):
            load_rgb(tmp_path / name)


class _Hung(Exception):
    """Not an OSError (as TimeoutError is), which the code under test might turn into BadImage."""


@contextlib.contextmanager
def _deadline(seconds: int = 20):
    """A regression that hangs (a walk that never ends, an open that waits on a FIFO) fails the test
    instead of stalling the suite."""
    def expire(*_):
        raise _Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _png(path, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (9, 9, 9)).save(path)


def _old_listing(root: Path) -> list[str]:
    """Today's listing before the safe walker, verbatim in substance: its order defines stores' content ids."""
    def visible(folder):
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
        return sorted(out)

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [str(f.relative_to(root)) for d in (subdirs or [root]) for f in visible(d)]


def _old_eval_listing(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames
                if not f.startswith(".") and f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))]
    return sorted(out)


def test_listing_order_and_content_id_are_those_of_the_old_walk(tmp_path):
    """Part-by-part order ("x/2" before "x-y/1"), unlike plain string order (which eval keeps), and the
    same digest: stores made before the safe walker still resume."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    names = ["a/x/2.png", "a/x-y/1.png", "a/x.y/3.PNG", "a/x y/0.jpg", "a/10.png", "a/9.png", "a/B.png",
             "a/notes.txt", "b/deep/er/1.png", "b/deep-er/0.png", "b/.hidden.png", "b/.cache/5.png", "B/1.png",
             "c d/1.jpeg", "top.png"]
    for i, name in enumerate(names):
        if name.endswith(".txt"):
            (root / name).write_text("not an image, listed all the same")
        else:
            _png(root / name, 16 + i)
    _png(outside / "linked.png")
    os.symlink(outside, root / "b" / "link")  # an ordinary directory symlink: followed as before
    listing = list_images(root)
    assert listing.files == _old_listing(root) and "a/x/2.png" in listing.files
    assert listing.files.index("a/x/2.png") < listing.files.index("a/x-y/1.png")
    assert listing.class_names == ["B", "a", "b", "c d"] and listing.ignored == ["top.png"] and listing.skipped == []
    old_id = hashlib.sha256()
    for rel in listing.files:
        old_id.update(f"{rel}\t{os.path.getsize(root / rel)}\n".encode())
    assert listing.content_id() == old_id.hexdigest()
    assert listing.stats == [(os.stat(root / f).st_size, os.stat(root / f).st_mtime_ns) for f in listing.files]
    sub = list_images(root, limit=5)
    assert len(sub.stats) == 5 and sub.stats == [listing.stats[listing.files.index(f)] for f in sub.files]

    from stages.eval.inputs import _list_image_files

    assert _list_image_files(root) == _old_eval_listing(root) and "a/x.y/3.PNG" in _list_image_files(root)


def test_crossing_directory_symlinks_list_each_image_once(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png")
    os.symlink(tmp_path / "b", tmp_path / "a" / "link_to_b")
    os.symlink(tmp_path / "a", tmp_path / "b" / "link_to_a")
    with _deadline():
        listing = list_images(tmp_path)
        files, skipped = walk_files(tmp_path)
    assert listing.files == [os.path.join(c, f"{i}.png") for c in "ab" for i in range(2)]
    assert listing.labels == [0, 0, 1, 1]
    assert {p for p, _ in listing.skipped} == {"a/link_to_b", "b/link_to_a"}
    assert all("repeats folder" in why for _, why in listing.skipped)
    assert files == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"] and skipped == listing.skipped


def test_link_back_to_the_folder_is_reported_not_a_class(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.png")
    os.symlink(tmp_path, tmp_path / "loop")
    with _deadline():
        listing = list_images(tmp_path)
    assert listing.class_names == [] and listing.files == ["0.png", "1.png"]
    assert [p for p, _ in listing.skipped] == ["loop"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_named_like_an_image_is_skipped_and_never_blocks(tmp_path):
    from stages.eval.inputs import _list_image_files

    _png(tmp_path / "real.png")
    os.mkfifo(tmp_path / "x.png")
    with _deadline(10):
        listing = list_images(tmp_path)
        assert listing.files == ["real.png"]
        assert listing.skipped == [("x.png", "not a regular file (fifo)")]
        assert _list_image_files(tmp_path) == ["real.png"]
        with pytest.raises(BadImage, match="not a regular file"):
            load_rgb(tmp_path / "x.png")


def test_dangling_symlinks_are_skipped_and_reported(tmp_path):
    _png(tmp_path / "cls" / "0.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "cls" / "gone.png")
    os.symlink(tmp_path / "nowhere", tmp_path / "gone_top")  # at the top of a class-layout folder
    listing = list_images(tmp_path)
    assert listing.files == [os.path.join("cls", "0.png")] and listing.ignored == []
    assert listing.skipped == [("cls/gone.png", "dangling symlink"), ("gone_top", "dangling symlink")]
    with pytest.raises(BadImage, match="missing"):
        load_rgb(tmp_path / "cls" / "gone.png")


def test_rae_artifacts_inside_an_image_folder_are_not_listed(tmp_path):
    manifest = json.dumps({"kind": "latent-store", "complete": True})
    # A class-layout folder: an artifact beside the classes, and one nested inside a class.
    classes = tmp_path / "classes"
    _png(classes / "cat" / "0.png")
    _png(classes / "cat" / "decoded" / "0.png")
    (classes / "cat" / "decoded" / "manifest.json").write_text(manifest)
    _png(classes / "out" / "0.png")
    (classes / "out" / "manifest.json").write_text(manifest)
    _png(classes / "dog" / "0.png")
    (classes / "dog" / "manifest.json").write_text("[1, 2]")  # not a rae manifest: an ordinary class
    listing = list_images(classes)
    assert listing.class_names == ["cat", "dog"]
    assert listing.files == [os.path.join("cat", "0.png"), os.path.join("dog", "0.png"), os.path.join("dog", "manifest.json")]
    assert listing.skipped == [("cat/decoded", "a rae artifact"), ("out", "a rae artifact")]
    # A flat folder with rae's output written inside it stays flat (the artifact is no class).
    flat = tmp_path / "flat"
    for i in range(2):
        _png(flat / f"{i}.png")
    _png(flat / "rae_out" / "0.png")
    (flat / "rae_out" / "manifest.json").write_text(manifest)
    listing = list_images(flat)
    assert listing.class_names == [] and listing.files == ["0.png", "1.png"] and listing.labels == [-1, -1]
    assert listing.skipped == [("rae_out", "a rae artifact")]
    # The folder asked for is walked even when it is an artifact itself (eval scores `rae decode` folders).
    assert walk_files(flat / "rae_out", (".png",)) == (["0.png"], [])


def test_empty_class_folder_is_refused_in_one_line(tmp_path):
    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".DS_Store").write_text("x")  # hidden: still empty
    with pytest.raises(RaeError) as e:
        list_images(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "b") in msg and "remove it or add images" in msg


def test_load_rgb_refuses_a_file_that_changed_since_it_was_listed(tmp_path):
    path = tmp_path / "img.png"
    _png(path)
    st = os.stat(path)
    assert load_rgb(path, expect=(st.st_size, st.st_mtime_ns)).size == (20, 20)
    for expect in ((st.st_size + 1, st.st_mtime_ns), [st.st_size, st.st_mtime_ns - 1]):
        with pytest.raises(SourceChanged) as e:
            load_rgb(path, expect=expect)
        assert isinstance(e.value, ArtifactError) and "\n" not in str(e.value)
        assert str(path) in str(e.value) and "--overwrite" in str(e.value) and "cp -p" in str(e.value)


@pytest.mark.parametrize("change", ["replaced", "touched", "deleted"])
def test_check_sources_catches_replaced_touched_and_deleted_files(tmp_path, change):
    for i in range(600):  # more than one chunk of stats
        (tmp_path / f"{i:03d}.png").write_bytes(b"x" * (i % 7 + 1))
    listing = list_images(tmp_path)
    check_sources(tmp_path, listing.files, listing.stats)
    check_sources(tmp_path, listing.files, [list(s) for s in listing.stats], progress_label="checking")  # as JSON gives them back
    victim, later = tmp_path / "417.png", tmp_path / "590.png"
    for path in (later, victim):  # two changes: the first in list order is named
        if change == "replaced":
            path.write_bytes(b"y" * 100)
        elif change == "touched":
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        else:
            path.unlink()
    with pytest.raises(SourceChanged) as e:
        check_sources(tmp_path, listing.files, listing.stats)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(victim)) and "590" not in msg
    assert ("missing" in msg) == (change == "deleted") and ("-> 100 bytes" in msg) == (change == "replaced")


def _random_image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# (height, width): upscaled tiny images, short side exactly the target, odd sizes, very wide and very
# tall ones (Pillow 13 starts those with the vertical pass), short sides around the box-halving
# threshold (2 x target - 1, 2 x target, ...), and images that are already exactly S x S.
_SIZES_256 = [(375, 500), (500, 375), (333, 511), (20, 30), (40, 33), (256, 300), (300, 256), (256, 256),
              (257, 255), (331, 477), (1100, 700), (1333, 2001), (300, 2000), (2000, 300), (1500, 260),
              (511, 700), (700, 511), (512, 700), (1023, 1023), (1024, 800), (2047, 1025)]
_SIZES_512 = [(1023, 1024), (1024, 1023), (375, 500), (512, 512), (600, 2047), (2047, 600), (30, 20)]


@pytest.mark.parametrize("image_size,sizes,chunk", [(256, _SIZES_256, None), (512, _SIZES_512, 3), (64, None, 7)])
def test_batched_bicubic_crop_is_bit_exact_with_pillow(image_size, sizes, chunk):
    from stages.artifacts.images import banded_crop, bicubic_crop_batch, collate_banded

    rng = np.random.default_rng(image_size)
    if sizes is None:  # many random shapes and aspect ratios, some below, some above the halving threshold
        sizes = [(int(a), max(16, int(a * np.exp(r)))) for a, r in zip(rng.integers(16, 300, 80), rng.uniform(-1.8, 1.8, 80))]
    images = [_random_image(rng, h, w) for h, w in sizes]
    crops = [banded_crop(img, image_size) for img in images]
    got = bicubic_crop_batch(collate_banded(crops), chunk=chunk)
    assert got.shape == (len(images), 3, image_size, image_size) and str(got.dtype) == "torch.uint8"
    for img, crop, (h, w) in zip(images, got.permute(0, 2, 3, 1).numpy(), sizes):
        assert np.array_equal(crop, center_crop_arr(img, image_size)), f"{h}x{w} -> {image_size}"


def test_banded_crop_ships_only_the_pixels_it_reads_and_handles_pass_order():
    from PIL import __version__ as pil_version

    from stages.artifacts.images import banded_crop

    rng = np.random.default_rng(0)
    wide = banded_crop(_random_image(rng, 300, 2000), 256)
    assert wide.pixels.shape[0] == 300 and wide.pixels.shape[1] < 310  # the crop's columns (+ taps), not 2000
    assert not wide.transposed
    tall = banded_crop(_random_image(rng, 2000, 300), 256)
    assert tall.transposed == (int(pil_version.split(".")[0]) >= 13)  # Pillow 13 resizes it vertically first
    same = banded_crop(Image.new("RGB", (64, 64)), 64)  # nothing to resize: one tap of weight 1.0 per pass
    assert same.pixels.shape == (64, 64, 3) and same.row_coef.shape == (64, 1) and (same.row_coef == 1 << 22).all()


def test_fit_banded_finishes_the_widest_windows_on_the_cpu_and_stays_exact():
    """A batch whose padded canvas would not fit the loader's buffer: the windows that set its height or
    width become finished Pillow crops (identity coefficients), and the batch still equals Pillow."""
    from stages.artifacts.images import banded_crop, bicubic_crop_batch, canvas_bytes, collate_banded, fit_banded

    rng = np.random.default_rng(5)
    sizes = [(127, 300), (300, 127), (90, 80), (64, 64), (40, 200)]  # (h, w): two large windows
    images = [_random_image(rng, h, w) for h, w in sizes]
    crops = [banded_crop(img, 64) for img in images]
    capacity = 3 * 64 * 64 * 3 * len(crops)
    assert canvas_bytes(crops) > capacity
    fitted = fit_banded(crops, images, 64, capacity)
    assert canvas_bytes(fitted) <= capacity
    finished = [f.pixels.shape == (64, 64, 3) and f.row_coef.shape[1] == 1 for f in fitted]
    assert finished[0] and finished[1] and not finished[2]
    buf = np.full(capacity, 77, np.uint8)  # stale bytes in a reused buffer must not leak into the result
    got = bicubic_crop_batch(collate_banded(fitted, buf)).permute(0, 2, 3, 1).numpy()
    for img, crop in zip(images, got):
        assert np.array_equal(crop, center_crop_arr(img, 64))
    with pytest.raises(ValueError):
        fit_banded(crops, images, 64, 64 * 64 * 3)
