"""How each FID tool turns an image file into the FID Inception's input: its decoding, its
resize to 299x299 and its scaling to [-1, 1]. The tools disagree mostly here, not in the network.

Each protocol is the tool's own steps, in its order and in float32 as it computes them
(sources: pytorch-fid 0.3.0 `fid_score.py` and `inception.py`; torch-fidelity 0.4.0
`feature_extractor_inceptionv3.py` and `interpolate_compat_tensorflow.py`; clean-fid 0.1.35
`resize.py` and `inception_torchscript.py`):

    protocol         decode                   resize to 299x299                           scale
    pytorch-fid      PIL convert("RGB"), /255 torch bilinear, align_corners=False, no AA  2x - 1
    torch-fidelity   PIL convert("RGB")       TensorFlow 1 bilinear (no half-pixel shift) (x - 128) / 128
    clean-fid        PIL convert("RGB")       PIL bicubic on each channel as float32, clip (x - 128) / 128

Every tool squeezes the whole image to 299x299 (no crop, aspect ratio not kept). The two
bilinear resizes sample at different places and neither averages over the pixels it skips
when shrinking (aliasing); clean-fid's PIL resize widens its filter when shrinking
(antialiasing), which is why Parmar et al. (2022) call it "clean". The README's Metrics
section says which protocol reproduces which paper's numbers.

Input: an image (a path, bytes or a PIL image). Output: (299, 299, 3) float32 NHWC in [-1, 1].
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import PyinceptError
from ..preprocess import load_image

SIZE = 299                      # the 2015 graph's input side
F32 = np.float32


# --- the three resizes, (H, W, 3) float32 -> (SIZE, SIZE, 3) float32 --------------------------


def torch_bilinear(x, size=SIZE):
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)`, antialias off.

    Output pixel d samples the input at s = (d + 0.5) * in/out - 0.5 (clamped at 0): pixel
    centres line up. The two neighbours lo = floor(s) and hi = min(lo + 1, in - 1) are
    weighted 1 - f and f, f = s - lo; width first, then height (torch's `Interpolate`).
    """
    rows = _torch_taps(x.shape[0], size)
    cols = _torch_taps(x.shape[1], size)
    return _bilinear(x, rows, cols, lerp=False)


def tf1_bilinear(x, size=SIZE):
    """TensorFlow 1's `resize_bilinear` (align_corners=False), as torch-fidelity's "slow" method.

    Output pixel d samples the input at s = d * in/out, with no half-pixel shift, so the
    picture moves up and left by half an input pixel against the other resizes.
    Interpolates as a + (b - a) * f, width first, then height.
    """
    rows = _tf1_taps(x.shape[0], size)
    cols = _tf1_taps(x.shape[1], size)
    return _bilinear(x, rows, cols, lerp=True)


def pil_bicubic_per_channel(x, size=SIZE):
    """clean-fid's resize: each channel as a float32 ('F' mode) PIL image, bicubic with
    Pillow's antialiasing, then clipped to [0, 255]. No rounding to 8 bits in between."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c], F32)).resize((size, size), Image.Resampling.BICUBIC))
                for c in range(x.shape[2])]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(F32)


def _torch_taps(n_in, n_out):
    scale = F32(n_in) / F32(n_out)
    # torch's compiled kernel fuses scale * (d + 0.5) - 0.5 into one multiply-add, rounded
    # once: float64 holds the float32 product exactly, so this is that single rounding.
    # (Rounding twice moves a tap across a pixel edge now and then: 1e-5 off at 240x320.)
    s = (np.float64(scale) * (np.arange(n_out, dtype=F32) + F32(0.5)) - 0.5).astype(F32)
    s = np.maximum(s, F32(0))
    lo = s.astype(np.int64)
    f = np.clip(s - lo.astype(F32), 0, 1).astype(F32)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, f


def _tf1_taps(n_in, n_out):
    s = np.arange(n_out, dtype=F32) * F32(n_in / n_out)
    lo = s.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (s - lo.astype(F32)).astype(F32)


def _bilinear(x, rows, cols, lerp):
    (r0, r1, fy), (c0, c1, fx) = rows, cols
    fx, fy = fx[None, :, None], fy[:, None, None]
    top, bottom = x[r0], x[r1]                                         # (out, W, C) each
    a, b, c, d = top[:, c0], top[:, c1], bottom[:, c0], bottom[:, c1]  # (out, out, C)
    if lerp:                                                           # a + (b - a) f
        upper = a + (b - a) * fx
        lower = c + (d - c) * fx
        return (upper + (lower - upper) * fy).astype(F32)
    one = F32(1)
    upper = a * (one - fx) + b * fx                                    # (1 - f) a + f b
    lower = c * (one - fx) + d * fx
    return (upper * (one - fy) + lower * fy).astype(F32)


# --- the protocols -------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One tool's way from an image file to the network's input.

    pixels: uint8 (H, W, 3) -> float32 (H, W, 3), the tool's first step (pytorch-fid's
    ToTensor divides by 255; the others keep 0..255). resize: to (299, 299, 3).
    scale: float32 -> the [-1, 1] the network was trained on.
    """

    name: str
    tool: str
    pixels: Callable
    resize: Callable
    scale: Callable

    def __call__(self, image):
        """An image (path, bytes or PIL image) -> (299, 299, 3) float32, as the tool computes it."""
        rgb = np.asarray(load_image(image, plain_rgb=True))               # (H, W, 3) uint8
        return self.scale(self.resize(self.pixels(rgb)))


def _over_255(rgb):
    return rgb.astype(F32) / F32(255)                                  # torchvision ToTensor


def _as_float(rgb):
    return rgb.astype(F32)


def _twice_minus_one(x):
    return F32(2) * x - F32(1)                                         # pytorch-fid: 2 * x - 1


def _centre_128(x):
    return (x - F32(128)) / F32(128)                                   # the 2015 graph's own Sub, Mul


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("pytorch-fid", "pytorch-fid 0.3.0", _over_255, torch_bilinear, _twice_minus_one),
        Protocol("torch-fidelity", "torch-fidelity 0.4.0", _as_float, tf1_bilinear, _centre_128),
        Protocol("clean-fid", "clean-fid 0.1.35, mode 'clean'", _as_float, pil_bicubic_per_channel, _centre_128),
    )
}


def get_protocol(protocol):
    """A `Protocol`, or its name in PROTOCOLS."""
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise PyinceptError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}") from None
