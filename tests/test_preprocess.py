"""Tests for pyincept.preprocess: torchvision's own transforms are the oracle.

`preprocess` must equal `Inception_V3_Weights.IMAGENET1K_V1.transforms()` followed by
`Inception3._transform_input` on the shipped photographs and on awkward synthetic sizes
(1x1, 10x10, 1000x50, exactly 342 and 299, sizes where the crop offset is a half).
`load_image` must turn every Pillow mode into RGB by the rules in its docstring, apply EXIF
orientation, refuse decompression bombs, and answer every bad file (truncated, corrupt,
empty, not an image, missing, a folder, unreadable) with a one-line ImageError naming the
file; Hypothesis feeds it random bytes and damaged real files to check nothing else escapes.
"""

import builtins
import importlib
import io
import os
import types

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from photos import PHOTOS
from pyincept.errors import PyinceptError
from pyincept.models import get_spec
from pyincept.preprocess import ImageError, load_image, preprocess, preprocess_batch

# The module itself (`pyincept.preprocess` may name the function once the package re-exports it).
preprocess_module = importlib.import_module("pyincept.preprocess")
fuzz_settings = settings(max_examples=200, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


def torchvision_preprocess(image):
    """The published recipe, run by torchvision itself: transforms(), then the network's transform_input."""
    x = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.transforms()(image)[None]
    x = torchvision.models.Inception3._transform_input(types.SimpleNamespace(transform_input=True), x)
    return x[0].permute(1, 2, 0).numpy()


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgb(source):
    """load_image's result as an (H, W, 3) uint8 array, after checking it is an RGB PIL image."""
    image = load_image(source)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (image.height, image.width, 3)
    return pixels


# --- preprocess vs torchvision ---------------------------------------------------------


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_photos_match_torchvision(path):
    image = Image.open(path).convert("RGB")
    ours = preprocess(image)
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_preprocess(image), rtol=0, atol=1e-5)


# (width, height): tiny (upsampled, never padded), extreme aspect ratios, exactly the resize
# and crop sizes (no resize at all), odd sizes, and 342x344, whose crop offset (344-299)/2 =
# 22.5 torchvision rounds half to even (22, not 23).
SIZES = [(1, 1), (10, 10), (2, 3), (1000, 50), (50, 1000), (342, 342), (299, 299), (342, 344),
         (344, 342), (343, 517), (300, 341), (641, 479)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_synthetic_sizes_match_torchvision(size):
    image = random_image(*size)
    ours = preprocess(image)
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_preprocess(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(30, 90), (90, 30), (7, 8)], ids=str)
def test_crop_larger_than_resize_is_zero_padded_like_torchvision(size):
    image = random_image(*size)
    transform = torchvision.transforms._presets.ImageClassification(crop_size=121, resize_size=100)
    expected = transform(image).permute(1, 2, 0).numpy()
    ours = preprocess(image, resize_size=100, crop_size=121, transform_input=False)
    assert ours.shape == (121, 121, 3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_transform_input_maps_pixels_to_minus_one_one():
    image = random_image(342, 342)                  # no resize; the crop starts at round(21.5) = 22
    x = preprocess(image)
    pixels = np.asarray(image, np.float32)[22:321, 22:321]
    np.testing.assert_allclose(x, pixels / 127.5 - 1, atol=1e-6)
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6


def test_config_settings_paths_and_bytes_give_the_same_array():
    path = PHOTOS[0]
    expected = preprocess(Image.open(path))
    np.testing.assert_array_equal(preprocess(path, **get_spec("inception_v3").default_weights.preprocessing), expected)
    np.testing.assert_array_equal(preprocess(str(path)), expected)
    np.testing.assert_array_equal(preprocess(path.read_bytes()), expected)


def test_preprocess_batch():
    images = [random_image(40, 30, seed=s) for s in range(3)]
    batch = preprocess_batch(images)
    assert batch.shape == (3, 299, 299, 3) and batch.dtype == np.float32
    for x, image in zip(batch, images):
        np.testing.assert_array_equal(x, preprocess(image))
    assert preprocess_batch(iter(images), resize_size=64, crop_size=56).shape == (3, 56, 56, 3)
    assert preprocess_batch([]).shape == (0, 299, 299, 3)


# --- every mode -> RGB -----------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pillow_mode_becomes_rgb(mode):
    image = Image.new(mode, (5, 4))
    assert rgb(image).shape == (4, 5, 3)
    assert image.mode == mode  # the caller's image is left alone


def test_bilevel_and_grey():
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert rgb(encode(bilevel, "PNG")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(rgb(encode(Image.fromarray(grey), "PNG")), np.repeat(grey[..., None], 3, axis=2))


def over_white(c, a):
    """The documented compositing rule, in floating point."""
    return np.rint((a * c + (255 - a) * 255) / 255).astype(np.uint8)


def test_rgba_is_composited_over_white():
    colour, alpha = np.meshgrid(np.arange(0, 256, 5), np.arange(256), indexing="ij")   # every alpha
    rgba = np.stack([colour, 255 - colour, colour // 2, alpha], axis=-1).astype(np.uint8)
    out = rgb(encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(out, over_white(rgba[..., :3].astype(float), rgba[..., 3:].astype(float)))
    assert (out[:, 0] == 255).all()                             # alpha 0: white
    np.testing.assert_array_equal(out[:, 255], rgba[:, 255, :3])  # alpha 255: unchanged


def test_grey_with_alpha_is_composited_over_white():
    la = np.array([[[0, 0], [0, 255], [100, 128], [200, 10]]], np.uint8)
    out = rgb(encode(Image.fromarray(la, "LA"), "PNG"))
    expected = over_white(la[..., :1].astype(float), la[..., 1:].astype(float))
    np.testing.assert_array_equal(out, np.repeat(expected, 3, axis=2))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_and_without_transparency(fmt):
    palette = [10, 20, 30, 200, 100, 50] + [0] * 762
    image = Image.new("P", (2, 1))
    image.putpalette(palette)
    image.putpixel((1, 0), 1)
    assert rgb(encode(image, fmt)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    assert rgb(encode(image, fmt, transparency=0)).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_rgb_with_a_transparent_colour_key():
    pixels = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    png = encode(Image.fromarray(pixels), "PNG", transparency=(1, 2, 3))   # a PNG tRNS chunk
    assert rgb(png).tolist() == [[[255, 255, 255], [4, 5, 6]]]


def test_cmyk_follows_pillow_conversion():
    cmyk = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    cmyk[0, 0], cmyk[0, 1] = (0, 0, 0, 0), (0, 0, 0, 255)
    image = Image.fromarray(cmyk, "CMYK")
    out = rgb(image)
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    jpeg = encode(image, "JPEG", quality=95)                     # a real CMYK JPEG, lossy
    assert np.abs(rgb(jpeg).astype(int) - out).mean() < 8


def test_ycbcr_follows_pillow_conversion():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8), "YCbCr")
    np.testing.assert_array_equal(rgb(image), np.asarray(image.convert("RGB")))
    assert rgb(Image.new("YCbCr", (1, 1), (128, 128, 128))).tolist() == [[[128, 128, 128]]]


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF")])
def test_16_bit_grey_is_divided_by_257(mode, fmt):
    values = np.array([[0, 257, 1000, 65535]], np.uint16)
    image = Image.fromarray(values.astype(">u2" if mode == "I;16B" else "<u2"))
    assert image.mode == mode
    out = rgb(encode(image, fmt))
    assert out[..., 0].tolist() == [[0, 1, 4, 255]] and (out == out[..., :1]).all()


def test_32_bit_integers_are_clipped_16_bit_intensities():
    image = Image.fromarray(np.array([[-5, 0, 514, 65535, 1_000_000]], np.int32), "I")
    assert rgb(encode(image, "TIFF"))[..., 0].tolist() == [[0, 0, 2, 255, 255]]


def test_float_is_clipped_and_truncated_like_pillow():
    image = Image.fromarray(np.array([[-3, 1.7, 254.6, 300, np.nan]], np.float32), "F")
    assert rgb(encode(image, "TIFF"))[..., 0].tolist() == [[0, 1, 254, 255, 0]]


# --- orientation and size limits ------------------------------------------------------


def test_exif_orientation_is_applied():
    pixels = np.zeros((32, 64, 3), np.uint8)        # 64 wide, 32 tall
    pixels[:16, :16] = (255, 0, 0)                  # red marker, top left
    exif = Image.Exif()
    exif[0x0112] = 6                                # Orientation 6: display rotated 90 degrees clockwise
    jpeg = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    out = rgb(jpeg)
    assert out.shape == (64, 32, 3)                 # now 32 wide, 64 tall
    assert out[8, 24, 0] > 200 and out[8, 8, 0] < 50  # the marker moved to the top right
    assert load_image(load_image(jpeg)).size == (32, 64)       # oriented once, not twice
    np.testing.assert_array_equal(preprocess(load_image(jpeg)), preprocess(jpeg))


@pytest.mark.parametrize("where", ["ours", "pillow warning", "pillow error"])
def test_decompression_bomb_is_refused(monkeypatch, where):
    png = encode(Image.new("RGB", (20, 20)), "PNG")
    assert rgb(png).shape == (20, 20, 3)
    if where == "ours":
        monkeypatch.setattr(preprocess_module, "MAX_PIXELS", 399)
    else:  # Pillow warns past its limit and raises past twice it: both are refusals
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 399 if where == "pillow warning" else 100)
    with pytest.raises(ImageError, match="decompression bomb") as caught:
        load_image(png)
    assert "\n" not in str(caught.value)


def test_postscript_is_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"     # Pillow alone would hand it to Ghostscript
    with pytest.raises(ImageError, match="not an image"):
        load_image(eps)


# --- bad input -------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    """{name: (path, expected reason)} for files load_image must refuse."""
    jpeg = PHOTOS[0].read_bytes()
    png = encode(Image.open(PHOTOS[0]), "PNG")
    files = {
        "photo.jpg": (jpeg[: len(jpeg) // 2], "truncated image file"),
        "photo.png": (png[: len(png) // 2], "truncated image file"),
        "empty.jpg": (b"", "empty file"),
        "noise.jpg": (np.random.default_rng(0).bytes(4096), "not an image"),
        "notes.txt": (b"shopping list\nmilk\n", "not an image (cannot identify image file)"),
    }
    out = {}
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, reason)
    out["missing.jpg"] = (tmp_path / "missing.jpg", "no such file")
    (tmp_path / "album").mkdir()
    out["album"] = (tmp_path / "album", "folder")
    return out


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "empty.jpg", "noise.jpg", "notes.txt",
                                  "missing.jpg", "album"])
def test_bad_files_raise_one_line_image_error(bad_files, name):
    path, reason = bad_files[name]
    for source in (path, str(path)):
        with pytest.raises(ImageError) as caught:
            load_image(source)
        message = str(caught.value)
        assert isinstance(caught.value, PyinceptError)
        assert "\n" not in message and name in message and reason in message, message


def test_bad_bytes_raise_image_error(bad_files):
    path, _ = bad_files["photo.jpg"]
    with pytest.raises(ImageError, match="^<bytes>: truncated image file$"):
        load_image(path.read_bytes())


def test_truncated_pil_image_fails_in_load_image():
    truncated = io.BytesIO(PHOTOS[0].read_bytes()[:5000])
    image = Image.open(truncated)                     # Pillow reads only the header here
    with pytest.raises(ImageError, match="truncated image file"):
        load_image(image)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.jpg"
    path.write_bytes(PHOTOS[0].read_bytes())
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):      # what open() does without read permission
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(ImageError, match="secret.jpg: permission denied$"):
        load_image(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(PHOTOS[0].read_bytes())
    path.chmod(0)
    with pytest.raises(ImageError, match="secret.jpg: permission denied$"):
        load_image(path)


def loads_or_refuses(data):
    """The contract for any bytes: an RGB image, or an ImageError with one line. Nothing else."""
    try:
        image = load_image(data)
    except ImageError as e:
        assert "\n" not in str(e) and str(e).startswith("<bytes>: ")
    else:
        assert isinstance(image, Image.Image) and image.mode == "RGB"


@fuzz_settings
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_load_or_raise_image_error(data):
    loads_or_refuses(data)


def small_files():
    """A small real file in each common format, to damage."""
    pixels = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [encode(image, "PNG"), encode(image, "JPEG", exif=exif), encode(image.convert("P"), "GIF"),
            encode(image, "BMP"), encode(image, "TIFF"), encode(image.convert("RGBA"), "WEBP")]


SMALL_FILES = small_files()


@pytest.mark.filterwarnings("ignore::UserWarning")   # Pillow warns about the corrupt EXIF it skips
@fuzz_settings
@given(original=st.sampled_from(SMALL_FILES), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=6))
def test_damaged_real_files_load_or_raise_image_error(original, cut, flips):
    damaged = bytearray(original[: round(cut * len(original))])
    for position, bit in flips:
        if damaged:
            damaged[position % len(damaged)] ^= 1 << bit
    loads_or_refuses(bytes(damaged))
