import numpy as np
import pytest
from PIL import Image

from stages.errors import RaeError
from stages.images import BadImage, center_crop_arr, list_images, load_rgb


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
    from stages.images import banded_crop, bicubic_crop_batch, collate_banded

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

    from stages.images import banded_crop

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
    from stages.images import banded_crop, bicubic_crop_batch, canvas_bytes, collate_banded, fit_banded

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
