"""Peek inside: one layer's activations as one greyscale picture, a tile per channel.

This is the "Peek Inside" section of the blog post this project grew from
(shared/seed): Mixed_5b.branch_pool, 35x35x32 for a 299x299 photo, laid out as 8 rows
by 4 columns of 35x35 tiles, 140 pixels wide and 280 high, "the whiter a pixel is, the
more excited the filter is". The post builds it with reshape -> transpose -> reshape;
`activation_grid` does the same, plus per-tile contrast, optional separators and
nearest-neighbour zoom.

What it is not: a feature-visualisation method (no gradients, no optimised inputs).
It shows what a layer computed for one image, nothing more.

Layout and contrast, exactly:

- channel c is the tile at row c // cols, column c % cols; rows = ceil(C / cols);
  tiles past the last channel stay black (0);
- each tile is min-max stretched on its own to 0..255 (its least excited pixel black,
  its most excited white), so a weak channel is as readable as a strong one; a
  constant tile (a dead ReLU, say) has nothing to show and is all black. A layer of
  1x1 tiles (avgpool, fc) would then be all black, so there the whole vector is
  stretched as one: each tile's grey is that channel's place between the layer's
  least and most excited channel;
- `pad` separator pixels go between tiles only (no outer border), in `pad_value`,
  mid-grey 128 by default: distinct from the black of a quiet pixel or an empty tile
  and the white of an excited one, so tile edges stay visible;
- `scale` zooms the finished grid, separators included: every pixel becomes a
  scale x scale block. Output shape is
  ((rows*H + (rows-1)*pad) * scale, (cols*W + (cols-1)*pad) * scale).
"""

import numpy as np
from PIL import Image

SEPARATOR_GREY = 128


def activation_grid(activations, cols=4, pad=0, scale=1, pad_value=SEPARATOR_GREY):
    """A uint8 (height, width) picture of one image's activations at one layer.

    activations: NHWC for one image, (H, W, C) or (1, H, W, C); or a feature vector
    (C,) or (1, C), like avgpool or fc, drawn as 1x1 tiles. See the module docstring
    for layout, contrast, `pad` and `scale`.
    """
    a = _one_image(activations)                                           # (H, W, C)
    if not (isinstance(cols, (int, np.integer)) and cols >= 1):
        raise ValueError(f"cols must be an integer >= 1, got {cols!r}")
    if not (isinstance(pad, (int, np.integer)) and pad >= 0):
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if not (isinstance(pad_value, (int, np.integer)) and 0 <= pad_value <= 255):
        raise ValueError(f"pad_value must be an integer grey level 0..255, got {pad_value!r}")
    if not np.isfinite(a).all():
        raise ValueError("activations contain NaN or infinity; there is nothing sensible to draw")

    H, W, C = a.shape
    rows = -(-C // cols)                                                  # ceil(C / cols)
    tiles = np.zeros((H + pad, W + pad, rows * cols), np.uint8)          # empty tiles stay black
    tiles[:H, :W, :C] = _stretch(a)
    tiles[H:, :, :] = pad_value                                           # separator below each tile
    tiles[:, W:, :] = pad_value                                           # and to its right

    # The blog's reshape -> transpose -> reshape: split channels into (rows, cols), then
    # interleave so a grid row is [tile row r, pixel row y] and a grid column is
    # [tile column q, pixel column x]. C order makes channel c = r * cols + q.
    grid = tiles.reshape(H + pad, W + pad, rows, cols).transpose(2, 0, 3, 1)
    grid = grid.reshape(rows * (H + pad), cols * (W + pad))
    grid = grid[: rows * (H + pad) - pad, : cols * (W + pad) - pad]     # separators between tiles only
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)             # nearest-neighbour zoom


def save_grid(grid, path):
    """Write a grid from `activation_grid` as an 8-bit greyscale PNG (whatever the suffix)."""
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.dtype != np.uint8:
        raise ValueError(f"a grid is a 2-D uint8 array, got {grid.dtype} with shape {grid.shape}")
    Image.fromarray(grid).save(path, format="PNG")                       # 2-D uint8 -> mode "L"
    return path


def _one_image(activations):
    """(H, W, C) float64 from (H, W, C), (1, H, W, C), (C,) or (1, C)."""
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim in (2, 4):                                                  # a batch: (N, C) or (N, H, W, C)
        if a.shape[0] != 1:
            raise ValueError(f"activations hold a batch of {a.shape[0]} images; pass one image, e.g. acts[i:i + 1]")
        a = a[0]
    if a.ndim == 1:
        a = a.reshape(1, 1, -1)                                          # a feature vector: 1x1 tiles
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"activations must be NHWC (1, H, W, C), (H, W, C) or a vector (1, C); got shape {np.shape(activations)}")
    return a


def _stretch(a):
    """Per-channel min-max to 0..255 (whiter = more excited); constant channels become 0.

    Tiles of one pixel are constant by themselves, so a vector is stretched as a whole.
    """
    axes = (0, 1, 2) if a.shape[:2] == (1, 1) else (0, 1)
    lo, hi = a.min(axis=axes, keepdims=True), a.max(axis=axes, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0) * 255.0, 0.0)
    return np.rint(out).astype(np.uint8)
