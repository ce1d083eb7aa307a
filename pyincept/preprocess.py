"""Image file -> the float32 array a network expects: decode, orient, resize, crop, normalise.

What this is: `load_image` turns a path, bytes or a PIL image into an 8-bit RGB PIL image,
by the rules in its docstring, and refuses anything it cannot read with an `ImageError`
whose one-line message names the file. `preprocess` is torchvision's published recipe for
the Inception v3 weights, reproduced bit for bit with Pillow and NumPy:
`Inception_V3_Weights.IMAGENET1K_V1.transforms()` (torchvision/transforms/_presets.py,
`ImageClassification(crop_size=299, resize_size=342)`), then the network's own
`transform_input` (models/inception.py, `Inception3._transform_input`). Its output is one
NHWC image; `preprocess_batch` stacks several into `(N, 299, 299, 3)`.

What this is not: data augmentation (no random crops or flips), colour management (ICC
profiles are ignored, as torchvision ignores them), or a general image library. It imports
neither torch nor numba.

The defaults are Inception v3's recipe (a 299x299x3 input, Szegedy et al. 2016, Table 1);
every model's own recipe travels with its weights (`WeightSet.preprocessing` in the model's
file, copied into each converted weight file's metadata), e.g. GoogLeNet's resize 256, crop 224.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from .errors import PyinceptError

# Refuse images with more pixels than this before decoding them. A few hundred bytes of
# PNG can declare a 100000x100000 image whose decoding needs 30 GB: a "decompression
# bomb". This is Pillow's own default (`Image.MAX_IMAGE_PIXELS`: 1 GiB / 4 / 3 pixels,
# about 9459x9459), but ours is a constant of this module, so tests and callers can change
# it without touching Pillow's process-wide setting.
MAX_PIXELS = 89_478_485

# Pillow decodes EPS by running Ghostscript, an external PostScript interpreter with a long
# history of security holes, on the file. A classifier has no need of PostScript.
REFUSED_FORMATS = frozenset({"EPS"})


class ImageError(PyinceptError):
    """An image could not be read: missing, unreadable, not an image, truncated, corrupt, or too large."""


def load_image(source, plain_rgb=False):
    """Decode `source` (a path, the bytes of an image file, or a PIL image) into an RGB PIL image.

    plain_rgb=True decodes as `Image.open(f).convert("RGB")` does, which is what pytorch-fid,
    torch-fidelity and clean-fid do: no EXIF rotation, alpha dropped, Pillow's own mode
    conversions (16-bit clipped at 255). Their scores need their decoding
    (`pyincept.metrics.protocols`). The size limit, the refused formats and the errors are as below.

    The whole image is decoded here (`Image.load`), so a truncated or corrupt file fails
    now, with an `ImageError`, and never later inside `preprocess`. Only the first frame of
    an animation or multi-page file is kept. The EXIF orientation tag, if any, is applied
    (`ImageOps.exif_transpose`), so a phone photo comes out the right way up.

    How each Pillow mode becomes 8-bit RGB:

    * RGB: unchanged.
    * 1 (bilevel): 0 -> (0, 0, 0), 1 -> (255, 255, 255).
    * L (grey): v -> (v, v, v).
    * P (palette): each index becomes its palette colour.
    * RGBA, LA, La, PA, RGBa, and any image with transparency information (a palette with
      alpha, or a `transparency` key: P, L or RGB with a PNG tRNS chunk, GIF's transparent
      index): composited over a WHITE background, c' = round(a*c + (255-a)*255) / 255
      with a the straight (not premultiplied) alpha. So alpha 0 is white and alpha 255
      leaves the colour as it was.
    * CMYK, YCbCr, LAB, HSV, RGBX: Pillow's `convert("RGB")`. For CMYK that is the naive
      R = (255-C)(255-K)/255 and likewise for G and B, with no ICC profile.
    * I;16, I;16B, I;16L, I;16N (16-bit) and I (32-bit signed): the value is read as a
      16-bit intensity, v -> round(v / 257) clipped to 0..255, then grey as for L. So 65535
      is white and 257*k is k. (Pillow's own conversion clips at 255 instead, which turns
      nearly every 16-bit image white.) These images are treated as opaque.
    * F (32-bit float): Pillow's rule: clipped to 0..255 and truncated towards zero
      (NaN becomes 0), then grey as for L.

    Raises `ImageError` ("photo.jpg: truncated image file") for a missing path, a folder,
    an unreadable file, an empty file, something that is not an image, a truncated or
    corrupt image, and an image of more than `MAX_PIXELS` pixels.
    """
    if isinstance(source, Image.Image):
        return _decode(source, getattr(source, "filename", "") or "<PIL image>", plain_rgb)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "<bytes>", plain_rgb)
    if isinstance(source, (str, os.PathLike)):
        return _decode_bytes(_read_file(source), os.fspath(source), plain_rgb)
    raise TypeError(f"load_image takes a path, bytes or a PIL image, not {type(source).__name__}")


def preprocess(
    image,
    resize_size=342,
    crop_size=299,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    transform_input=True,
):
    """One image (anything `load_image` takes) -> (crop_size, crop_size, 3) float32, HWC.

    Step for step what torchvision does to a PIL image (torchvision/transforms/functional.py
    `resize` and `center_crop`, _functional_pil.py), so the result equals
    `transforms()(image)` followed by `Inception3._transform_input`, bit for bit:

    1. Resize the shorter side to `resize_size`, bilinear with Pillow's antialiasing.
    2. Centre crop `crop_size` x `crop_size` (zero-padding first if the image is smaller).
    3. Scale to [0, 1] and normalise with the ImageNet `mean` and `std`.
    4. If `transform_input`: x * std/0.5 + (mean-0.5)/0.5 per channel.
    """
    image = load_image(image)
    pixels = _center_crop(np.asarray(_resize_shorter_side(image, resize_size)), crop_size)

    # torchvision's arithmetic, in its order and in float32 throughout (a Python float
    # meeting a float32 tensor is rounded to float32 first), so the rounding matches too.
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - mean.astype(np.float32)) / std.astype(np.float32)
    if transform_input:
        # Google trained Inception v3 on pixels scaled to [-1, 1] (TF-slim's
        # inception_preprocessing), not on ImageNet-normalised ones. torchvision's port keeps
        # the ImageNet recipe for its inputs and converts inside the network: undo the
        # normalisation (x*std + mean is the [0, 1] pixel), then (pixel - 0.5) / 0.5.
        # Written as one multiply-add per channel, as torchvision does.
        x = x * (std / 0.5).astype(np.float32) + ((mean - 0.5) / 0.5).astype(np.float32)
    return x


def preprocess_batch(images, **settings):
    """Several images -> (N, crop_size, crop_size, 3) float32, each by `preprocess(image, **settings)`."""
    images = list(images)
    crop = settings.get("crop_size", 299)
    batch = np.empty((len(images), crop, crop, 3), np.float32)
    for n, image in enumerate(images):
        batch[n] = preprocess(image, **settings)
    return batch


# --- the recipe, step by step ----------------------------------------------------------


def _resize_shorter_side(image, size):
    """Shorter side to `size`, the longer one scaled to keep the aspect ratio (torchvision's
    `_compute_resized_output_size`: the long side is truncated, int(size * long / short),
    not rounded). Pillow's bilinear filter widens its support in proportion when shrinking,
    averaging every source pixel under it: that is the antialiasing torchvision asks for
    (for PIL input torchvision could not turn it off if it wanted to).
    """
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def _center_crop(pixels, size):
    """Centre `size` x `size` window of an (H, W, 3) array, as torchvision's `center_crop`.

    An image smaller than the crop is first padded with black, the extra pixel of an odd
    difference going right and bottom. The offset is int(round((H - size) / 2)) with
    Python's round, which rounds halves to even: a 344-pixel side starts at 22, not 23.
    """
    H, W = pixels.shape[:2]
    if size > H or size > W:
        pad_h, pad_w = max(size - H, 0), max(size - W, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        H, W = pixels.shape[:2]
    top = int(round((H - size) / 2.0))
    left = int(round((W - size) / 2.0))
    return pixels[top : top + size, left : left + size]


# --- decoding -------------------------------------------------------------------------


def _read_file(path):
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "is a folder, not an image file"
    except PermissionError:
        reason = "permission denied"
    except OSError as e:
        reason = f"cannot read ({e.strerror or e})"
    except ValueError as e:  # open() refuses paths with NUL bytes with a ValueError
        reason = f"invalid path ({e})"
    raise ImageError(f"{name}: {reason}")


def _decode_bytes(data, name, plain_rgb=False):
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    Image.init()  # register every plugin Pillow has, so the list of allowed formats is complete
    formats = [f for f in Image.OPEN if f not in REFUSED_FORMATS]
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own pixel limit and raises only past twice that; both
            # mean "too big" to us. (catch_warnings changes process-wide warning filters
            # for the duration, so it is not thread safe; it only matters for this warning.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Exception as e:
        raise ImageError(f"{name}: {_reason(e)}") from None
    return _decode(image, name, plain_rgb)


def _decode(image, name, plain_rgb=False):
    """Check the size, decode every pixel, orient (a failure in any -> ImageError), convert to RGB."""
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} is {w * h} pixels, more than the limit of {MAX_PIXELS} "
                         "(a decompression bomb?)")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    # Pillow's decoders and plugins raise whatever a damaged file provokes (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, IndexError, ...); Pillow's own fuzzers catch Exception
    # for that reason. So every call that parses the file is inside this `try`, and nothing
    # else: the mode conversion below works on pixels already decoded, and a bug there
    # should surface as itself, not as a "corrupt image".
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            if plain_rgb:
                return image.convert("RGB")
            image = ImageOps.exif_transpose(image)
    except Exception as e:
        raise ImageError(f"{name}: {_reason(e)}") from None
    return _to_rgb(image)


def _to_rgb(image):
    """The mode rules of `load_image`'s docstring."""
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        grey = np.clip(np.rint(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "La":  # premultiplied; Pillow converts it to straight alpha LA only
        image = image.convert("LA")
    transparent = (image.mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in image.info
                   or (image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"))
    if not transparent:
        return image if image.mode == "RGB" else image.convert("RGB")
    # Alpha compositing over white ("over" operator, Porter and Duff 1984) with straight
    # alpha a in 0..255: c' = (a*c + (255-a)*255) / 255, rounded to nearest.
    rgba = np.asarray(image.convert("RGBA"), np.uint32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    composite = (alpha * rgb + (255 - alpha) * 255 + 127) // 255
    return Image.fromarray(composite.astype(np.uint8))


def _reason(error):
    """One line saying what is wrong with the file, from whatever Pillow raised."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (a decompression bomb?): {_first_line(error)}"
    if isinstance(error, Image.UnidentifiedImageError):
        # Pillow's message names a BytesIO object, not the file; ours names the file.
        return "not an image (cannot identify image file)"
    message = _first_line(error)
    if "truncated" in message.lower():
        return "truncated image file"
    return f"corrupt image ({type(error).__name__}: {message})" if message else f"corrupt image ({type(error).__name__})"


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""
