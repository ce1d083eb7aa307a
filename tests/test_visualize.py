"""The activation grid: exact geometry (Hypothesis), the blog post's 140x280 picture, and
tile by tile agreement with what torchvision computes for the same layer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import pyincept
from photos import photo_batch
from pyincept.visualize import activation_grid, save_grid
from strategies import seeds
from torch_oracle import to_nchw, to_nhwc


def stretch(tile):
    """The contrast rule written out again: min-max to 0..255, a constant tile all black."""
    tile = np.asarray(tile, np.float64)
    span = tile.max() - tile.min()
    return np.zeros(tile.shape) if span == 0 else (tile - tile.min()) / span * 255


def tile_at(grid, c, cols, H, W, pad):
    """Channel c's tile in an unscaled grid."""
    top, left = (c // cols) * (H + pad), (c % cols) * (W + pad)
    return grid[top : top + H, left : left + W]


@settings(max_examples=60, deadline=None)
@given(
    H=st.integers(1, 9), W=st.integers(1, 9), C=st.integers(1, 20),
    cols=st.integers(1, 6), pad=st.integers(0, 3), scale=st.integers(1, 3),
    pad_value=st.sampled_from([128, 255, 7]), batched=st.booleans(), seed=seeds,
)
def test_grid_geometry_placement_and_contrast(H, W, C, cols, pad, scale, pad_value, batched, seed):
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((H, W, C)).astype(np.float32) * rng.uniform(0.01, 100)
    acts[..., rng.random(C) < 0.2] = 1.5                                   # some constant (dead) channels
    grid = activation_grid(acts[None] if batched else acts, cols=cols, pad=pad, scale=scale, pad_value=pad_value)

    rows = -(-C // cols)
    assert grid.dtype == np.uint8
    assert grid.shape == ((rows * H + (rows - 1) * pad) * scale, (cols * W + (cols - 1) * pad) * scale)
    small = grid[::scale, ::scale]                                          # scale is a pure pixel zoom
    np.testing.assert_array_equal(grid, np.kron(small, np.ones((scale, scale), np.uint8)))

    is_tile = np.zeros(small.shape, bool)
    for c in range(rows * cols):
        tile = tile_at(small, c, cols, H, W, pad)
        tile_at(is_tile, c, cols, H, W, pad)[:] = True
        if c >= C:
            assert (tile == 0).all(), "an unused tile is background black"
        elif H * W == 1:
            continue                                                       # vector layers: checked below
        else:
            assert np.abs(tile.astype(float) - stretch(acts[..., c])).max() <= 0.5
            if np.ptp(acts[..., c]) == 0:
                assert (tile == 0).all()
            else:
                assert tile.min() == 0 and tile.max() == 255
    assert (small[~is_tile] == pad_value).all(), "separators, and only separators, are pad_value"
    if H * W == 1:                                                          # one-pixel tiles: stretched as a vector
        values = np.array([tile_at(small, c, cols, 1, 1, pad)[0, 0] for c in range(C)], float)
        assert np.abs(values - stretch(acts.ravel())).max() <= 0.5


def test_feature_vectors_are_one_pixel_tiles_stretched_together():
    grid = activation_grid(np.array([[0.0, 1.0, 2.0, 4.0, 4.0]]), cols=2)   # (1, C) like fc
    np.testing.assert_array_equal(grid, [[0, 64], [128, 255], [255, 0]])
    np.testing.assert_array_equal(activation_grid(np.arange(3.0).reshape(1, 1, 1, 3), cols=3), [[0, 128, 255]])


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(activations=np.zeros((2, 5, 5, 3))), "batch of 2 images; pass one image"),
        (dict(activations=np.zeros((2, 10))), "batch of 2 images"),
        (dict(activations=np.zeros((1, 1, 5, 5, 3))), "must be NHWC"),
        (dict(cols=0), "cols must be an integer >= 1"),
        (dict(pad=-1), "pad must be an integer >= 0"),
        (dict(scale=0), "scale must be an integer >= 1"),
        (dict(scale=1.5), "scale must be an integer >= 1"),
        (dict(pad_value=256), "pad_value must be an integer grey level 0..255"),
        (dict(activations=np.full((3, 3, 2), np.nan)), "NaN"),
    ],
)
def test_bad_arguments_get_one_line_value_errors(args, message):
    kwargs = dict(activations=np.zeros((5, 5, 3)))
    kwargs.update(args)
    with pytest.raises(ValueError, match=message):
        activation_grid(**kwargs)


def test_activation_grid_shows_what_torchvision_computes_for_that_layer(tv_inception, converted, tmp_path):
    """The blog post's picture, Mixed_5b.branch_pool on a photo: 8x4 tiles, 140 wide, 280 high,
    and every tile is torchvision's own output for that channel, stretched independently."""
    x = photo_batch()[:1]
    acts = pyincept.inception_v3(converted["zip"]).run(x, ["Mixed_5b.branch_pool"])["Mixed_5b.branch_pool"]
    grid = activation_grid(acts)

    captured = []
    hook = tv_inception.Mixed_5b.branch_pool.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            tv_inception(to_nchw(x))
    finally:
        hook.remove()
    expected = to_nhwc(captured[0])[0]                                      # (35, 35, 32)

    assert grid.shape == (280, 140)                                         # 8 rows x 4 cols of 35x35
    live = 0
    for c in range(32):
        tile = tile_at(grid, c, 4, 35, 35, 0).astype(float)
        assert np.abs(tile - stretch(expected[..., c])).max() <= 1, f"channel {c}"
        live += np.ptp(expected[..., c]) > 0
    assert live >= 16, "too many dead channels for the comparison to mean anything"

    path = save_grid(grid, tmp_path / "Mixed_5b.branch_pool.png")
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (140, 280))   # PIL: (width, height)
        np.testing.assert_array_equal(np.asarray(im), grid)


def test_save_grid_round_trips_any_grid_and_refuses_non_grids(tmp_path):
    grid = activation_grid(np.random.default_rng(0).standard_normal((7, 5, 6)), cols=4, pad=2, scale=3)
    save_grid(grid, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        np.testing.assert_array_equal(np.asarray(im), grid)
    with pytest.raises(ValueError, match="2-D uint8"):
        save_grid(np.zeros((4, 4), np.float32), tmp_path / "bad.png")
