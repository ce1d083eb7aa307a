"""Every kernel three ways: the Numba kernel, its NumPy reference twin, and torch.nn.functional.

Geometries come from tests/strategies.py: batch sizes, channels, odd and non-square
sizes, v3's 1x3/3x1/1x7/7x1/5x5 kernels, strides, per-side padding, every pool setting.
"""

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyincept.kernels import conv, cpu, gemm, runtime, winograd
from pyincept.kernels import reference as ref
from strategies import conv_geometry, pool_geometry, seeds
from torch_oracle import hwio_to_oihw, to_nchw, to_nhwc

SETTINGS = settings(max_examples=60, deadline=None)


def close(actual, expected, rtol=1e-5, atol=1e-5):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- convolution ---------------------------------------------------------------------


@SETTINGS
@given(conv_geometry(), st.booleans(), st.booleans(), seeds)
def test_conv2d_matches_reference_and_torch(geometry, with_bias, relu, seed):
    N, H, W, C, K, (R, S), stride, pads = geometry
    rng = np.random.default_rng(seed)
    x, w = randn(rng, N, H, W, C), randn(rng, R, S, C, K)
    b = randn(rng, K) if with_bias else None

    fast = cpu.conv2d(x, w, b, stride, pads, relu=relu)
    slow = ref.conv2d(x, w, b, stride, pads, relu=relu)

    top, bottom, left, right = pads
    xt = F.pad(to_nchw(x), (left, right, top, bottom))           # torch pads per side only via F.pad
    yt = F.conv2d(xt, hwio_to_oihw(w), None if b is None else torch.from_numpy(b), stride)
    expected = to_nhwc(F.relu(yt) if relu else yt)

    assert fast.shape == slow.shape == expected.shape
    close(fast, expected, atol=1e-5 * np.sqrt(R * S * C))
    close(slow, expected, atol=1e-5 * np.sqrt(R * S * C))


@SETTINGS
@given(conv_geometry(), st.booleans(), st.booleans(), seeds, st.sampled_from(gemm.runnable_paths()))
def test_conv2d_is_im2col_then_the_fma_chain_bit_for_bit(geometry, with_bias, relu, seed, path):
    """The fast conv (im2col tiles, or a 1x1 read in place, and the GEMM's epilogue) gives
    exactly the reference's im2col, then reference.gemm's FMA chains, then bias, then ReLU,
    on every SIMD path this CPU runs."""
    N, H, W, C, K, (R, S), stride, pads = geometry
    rng = np.random.default_rng(seed)
    x, w = randn(rng, N, H, W, C), randn(rng, R, S, C, K)
    b = randn(rng, K) if with_bias else None
    cols = ref.im2col(x, (R, S), stride, pads)                                      # (N, OH, OW, R*S*C)
    y = ref.gemm(cols.reshape(-1, R * S * C), w.reshape(-1, K)).reshape(*cols.shape[:3], K)
    y = y if b is None else y + b
    want = np.maximum(y, 0) if relu else y
    got = cpu.conv2d(x, gemm.pack_weights(w, gemm.SIMD_PATHS[path]), b, stride, pads, relu=relu)
    np.testing.assert_array_equal(got, want)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 300), st.integers(1, 70), st.booleans(), seeds)
def test_linear_is_the_fma_chain_then_the_bias_bit_for_bit(N, I, O, with_bias, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, N, I), randn(rng, I, O)
    b = randn(rng, O) if with_bias else None
    want = ref.gemm(x, w) if b is None else ref.gemm(x, w) + b
    np.testing.assert_array_equal(cpu.linear(x, w, b), want)
    np.testing.assert_array_equal(alone(lambda: cpu.linear(x[:1], w, b)), want[:1])      # split by panels


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 16), st.integers(1, 16), seeds)
def test_conv2d_1x1_fast_path(N, H, W, C, K, seed):
    """1x1 stride-1 skips im2col: the result is still the convolution."""
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, N, H, W, C), randn(rng, 1, 1, C, K), randn(rng, K)
    expected = to_nhwc(F.conv2d(to_nchw(x), hwio_to_oihw(w), torch.from_numpy(b)))
    close(cpu.conv2d(x, w, b), expected)
    close(ref.conv2d(x, w, b), expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.integers(1, 12), st.lists(st.integers(1, 40), min_size=1,
       max_size=4), st.booleans(), seeds)
def test_conv2d_heads_finish_column_ranges_into_their_outputs(N, H, W, C, widths, split, seed):
    """A fused 1x1's members as heads of one product (blocks.Fused1x1): each gets its columns
    + its bias (ReLU or not) in its output, a channel slice of a wider array, a fresh array
    or a view that is no window (every other row); the product itself stays raw. Alone on
    two threads too (`split`), where a product with few rows and many columns splits its
    columns, so a head may straddle the two halves."""
    rng = np.random.default_rng(seed)
    K = sum(widths)
    x, w = randn(rng, N, H, W, C), randn(rng, 1, 1, C, K)
    raw_expected = ref.conv2d(x, w)
    heads, expected, untouched, k0 = [], [], [], 0
    for i, width in enumerate(widths):
        b, relu = randn(rng, width), i % 2 == 0
        if i % 3 == 0:                                                              # a channel slice
            wide = np.full((N, H, W, width + 2), 7.0, np.float32)
            dst = wide[..., 1 : 1 + width]
            untouched += [wide[..., 0], wide[..., -1]]
        elif i % 3 == 1:
            dst = np.empty((N, H, W, width), np.float32)
        else:                                                                       # no window
            tall = np.full((N, 2 * H, W, width), 7.0, np.float32)
            dst = tall[:, ::2]
            untouched.append(tall[:, 1::2])
        heads.append((k0, b, relu, dst))
        expected.append(ref.bias_act(raw_expected[..., k0 : k0 + width], b, relu))
        k0 += width
    raw = alone(lambda: cpu.conv2d(x, w, heads=heads)) if split else cpu.conv2d(x, w, heads=heads)
    close(raw, raw_expected)
    for (_, _, _, dst), e in zip(heads, expected):
        close(dst, e)
    assert all((a == 7).all() for a in untouched)
    with pytest.raises(ValueError, match="raw product"):
        cpu.conv2d(x, w, np.zeros(K, np.float32), heads=heads)
    with pytest.raises(ValueError, match="not among"):
        cpu.conv2d(x, w, heads=[(K - 1, np.zeros(2, np.float32), True, np.empty((N, H, W, 2), np.float32))])


@SETTINGS
@given(st.sampled_from([((3, 3), 2), ((3, 3), 4), ((5, 5), 2), ((1, 3), 4), ((3, 1), 4), ((1, 7), 2), ((7, 1), 2),
                        ((1, 7), 4), ((7, 1), 4)]),
       st.integers(1, 3), st.integers(1, 11),
       st.integers(1, 11), st.integers(1, 9), st.integers(1, 9), st.tuples(*[st.integers(0, 3)] * 4), st.booleans(),
       st.booleans(), st.booleans(), seeds)
def test_winograd_matches_im2col_reference_and_torch(kind, N, H, W, C, K, pads, with_bias, relu, out_sliced, seed):
    """Winograd F(2x2, 3x3), F(4x4, 3x3), F(2x2, 5x5), F(4, 3) (1x3, 3x1), F(2, 7) and F(4, 7)
    (1x7, 7x1), fast and reference, against
    torch: output sizes that are and are not multiples of the tile (edge tiles partly
    outside), per-side padding (a 1D filter's only along its axis), a channel-slice output."""
    (R, S), tile = kind
    top, bottom, left, right = pads
    if R == 1:
        top = bottom = 0
    if S == 1:
        left = right = 0
    pads = (top, bottom, left, right)
    H, W = max(H, R - top - bottom), max(W, S - left - right)
    rng = np.random.default_rng(seed)
    x, w = randn(rng, N, H, W, C), randn(rng, R, S, C, K)
    b = randn(rng, K) if with_bias else None
    xt = F.pad(to_nchw(x), (left, right, top, bottom))
    yt = F.conv2d(xt, hwio_to_oihw(w), None if b is None else torch.from_numpy(b))
    expected = to_nhwc(F.relu(yt) if relu else yt)
    slow = ref.conv2d_winograd(x, ref.winograd_weights(w, tile), b, pads, relu=relu, kernel_size=(R, S))
    u = cpu.winograd_weights(w, tile)
    assert u.shape == ((tile + R - 1) ** 2 if R == S else tile + R + S - 2, C, K)
    if out_sliced:
        wide = np.full((*expected.shape[:3], K + 3), 7.0, np.float32)
        fast = cpu.conv2d_winograd(x, u, b, pads, relu=relu, out=wide[..., 1 : 1 + K], kernel_size=(R, S))
        assert np.shares_memory(fast, wide) and (wide[..., :1] == 7).all() and (wide[..., 1 + K :] == 7).all()
    else:
        fast = cpu.conv2d_winograd(x, u, b, pads, relu=relu, kernel_size=(R, S))
    tall = np.full((expected.shape[0], 2 * expected.shape[1], *expected.shape[2:]), 7.0, np.float32)
    into_rows = cpu.conv2d_winograd(x, u, b, pads, relu=relu, out=tall[:, ::2], kernel_size=(R, S))
    assert into_rows.base is tall and (tall[:, 1::2] == 7).all()        # any other view: the result copied in
    np.testing.assert_array_equal(into_rows, fast)
    # F(4x4, 3x3), F(2x2, 5x5), F(4, 3), F(2, 7) and F(4, 7) have coefficients up to 8 and 5.25 (and 1/24,
    # 1/90; F(4, 7)'s BT, scaled to integers, up to 525): a few times F(2x2)'s rounding.
    for y in (fast, slow):
        assert y.shape == expected.shape
        close(y, expected, atol=(1e-5 if (R, S, tile) == (3, 3, 2) else 4e-5) * np.sqrt(R * S * C))


WINOGRAD_KINDS = [((3, 3), 2), ((3, 3), 4), ((5, 5), 2), ((1, 3), 4), ((3, 1), 4), ((1, 7), 2), ((7, 1), 2),
                  ((1, 7), 4), ((7, 1), 4)]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([None] + WINOGRAD_KINDS), st.integers(2, 4), st.integers(1, 20), st.integers(1, 20),
       st.integers(1, 24), st.integers(1, 40), st.integers(1, 2), st.booleans(), seeds)
def test_each_image_gets_the_same_bits_alone_and_in_any_batch(kind, N, H, W, C, K, stride, split, seed):
    """conv2d (im2col, a 1x1, a stride) and conv2d_winograd: image i of a batch is exactly
    what image i alone gives, whole or split between a lone image's two threads. The
    images share each product, and every output is one FMA chain (kernels/gemm.py), which
    no neighbour, tile or thread can reorder."""
    rng = np.random.default_rng(seed)
    (R, S), tile = kind or (((1, 1), (3, 3), (1, 7))[seed % 3], None)
    pads = (R // 2, R // 2, S // 2, S // 2)
    H, W = max(H, R), max(W, S)
    x, w, b = randn(rng, N, H, W, C), randn(rng, R, S, C, K), randn(rng, K)
    if kind is None:
        run = lambda x: cpu.conv2d(x, w, b, stride, pads, relu=True)                              # noqa: E731
    else:
        u = cpu.winograd_weights(w, tile)
        run = lambda x: cpu.conv2d_winograd(x, u, b, pads, relu=True, kernel_size=(R, S))         # noqa: E731
    batch = run(x)
    for i in range(N):
        lone = alone(lambda: run(x[i : i + 1])) if split else run(x[i : i + 1])
        np.testing.assert_array_equal(lone[0], batch[i])


@pytest.mark.parametrize("r,tile", [(3, 2), (3, 4), (5, 2)])
def test_winograd_in_chunks_of_tiles(monkeypatch, r, tile):
    """Chunks of one tile and of a few tiles spanning rows: same numbers as one chunk."""
    rng = np.random.default_rng(5)
    x, w, b = randn(rng, 2, 9, 7, 4), randn(rng, r, r, 4, 6), randn(rng, 6)
    u = cpu.winograd_weights(w, tile)
    pad = r // 2
    whole = cpu.conv2d_winograd(x, u, b, pad, relu=True, kernel_size=(r, r))
    for floats in (1, len(u) * 10 * 3):
        monkeypatch.setattr(winograd, "_WINOGRAD_FLOATS", floats)
        close(cpu.conv2d_winograd(x, u, b, pad, relu=True, kernel_size=(r, r)), whole)
    close(whole, ref.conv2d(x, w, b, 1, pad, relu=True), atol=4e-5)


@pytest.mark.parametrize("shape,tile", [((3, 3, 448, 384), 2), ((1, 3, 384, 384), 4), ((7, 1, 160, 192), 4),
                                        ((5, 5, 48, 64), 2), ((3, 3, 96, 7), 4)])
def test_winograd_filters_in_blocks_have_the_whole_banks_bits(monkeypatch, shape, tile):
    """winograd_weights transforms a block of output channels at a time (the loading peak):
    every block size, one channel each included, gives the reference's whole-bank bits."""
    w = randn(np.random.default_rng(6), *shape)
    whole = ref.winograd_weights(w, tile).reshape(-1, shape[2], shape[3])
    for floats in (winograd._TRANSFORM_FLOATS, 1 << 19, 1):
        monkeypatch.setattr(winograd, "_TRANSFORM_FLOATS", floats)
        np.testing.assert_array_equal(cpu.winograd_weights(w, tile), whole)


def test_winograd_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="3x3, 5x5, 1x3, 3x1, 1x7 or 7x1 filters"):
        cpu.winograd_weights(np.zeros((1, 5, 4, 8), np.float32))
    with pytest.raises(ValueError, match="2 or 4"):
        cpu.winograd_weights(np.zeros((3, 3, 4, 8), np.float32), tile=3)
    with pytest.raises(ValueError, match="5x5 Winograd tiles are 2"):
        cpu.winograd_weights(np.zeros((5, 5, 4, 8), np.float32), tile=4)
    with pytest.raises(ValueError, match="1x7 Winograd tiles are 2 or 4 outputs long"):
        cpu.winograd_weights(np.zeros((7, 1, 4, 8), np.float32), tile=3)
    with pytest.raises(ValueError, match="1x3 Winograd tiles are 4 outputs long"):
        cpu.winograd_weights(np.zeros((1, 3, 4, 8), np.float32), tile=2)
    with pytest.raises(ValueError, match=r"1x7 must be \(8 or 10, C=4"):
        cpu.conv2d_winograd(np.zeros((1, 9, 9, 4), np.float32), np.zeros((6, 4, 2), np.float32), padding=(0, 3),
                            kernel_size=(1, 7))
    with pytest.raises(ValueError, match=r"5x5 must be \(36, C=4"):
        cpu.conv2d_winograd(np.zeros((1, 9, 9, 4), np.float32), np.zeros((16, 4, 8), np.float32), kernel_size=(5, 5))
    with pytest.raises(ValueError, match="16 or 36"):
        cpu.conv2d_winograd(np.zeros((1, 5, 5, 4), np.float32), np.zeros((25, 4, 8), np.float32))
    with pytest.raises(ValueError, match="only along its own axis"):
        cpu.conv2d_winograd(np.zeros((1, 9, 9, 4), np.float32), np.zeros((8, 4, 2), np.float32), padding=(1, 3),
                            kernel_size=(1, 7))
    with pytest.raises(ValueError, match="only along its own axis"):
        cpu.conv2d_winograd(np.zeros((1, 9, 9, 4), np.float32), np.zeros((6, 4, 2), np.float32), padding=1,
                            kernel_size=(3, 1))
    with pytest.raises(ValueError, match="3x3, 5x5, 1x3, 3x1, 1x7 and 7x1"):
        cpu.conv2d_winograd(np.zeros((1, 9, 9, 4), np.float32), np.zeros((6, 4, 2), np.float32), kernel_size=(1, 5))
    with pytest.raises(ValueError, match="C=3"):
        cpu.conv2d_winograd(np.zeros((1, 5, 5, 3), np.float32), np.zeros((16, 4, 8), np.float32))
    with pytest.raises(ValueError, match="smaller than kernel"):
        cpu.conv2d_winograd(np.zeros((1, 2, 5, 3), np.float32), cpu.winograd_weights(np.zeros((3, 3, 3, 8))))


@pytest.mark.parametrize("kernel,padding", [((1, 1), 0), ((3, 3), 1), ((1, 7), (0, 3)), ((7, 1), (3, 0))])
def test_conv2d_writes_into_a_channel_slice(kernel, padding):
    """A branch writes straight into its slice of the module's output; neighbours are untouched."""
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, 2, 9, 8, 5), randn(rng, *kernel, 5, 4), randn(rng, 4)
    out = np.full((2, 9, 8, 10), 7.0, np.float32)
    returned = cpu.conv2d(x, w, b, 1, padding, relu=True, out=out[..., 3:7])
    assert np.shares_memory(returned, out)
    close(out[..., 3:7], ref.conv2d(x, w, b, 1, padding, relu=True))
    assert (out[..., :3] == 7).all() and (out[..., 7:] == 7).all()


def test_im2col_orders_patch_as_r_s_c():
    """The unfolded row of pixel (0,0) is x's top-left 2x2 patch in (r, s, c) order."""
    x = np.arange(1 * 3 * 3 * 2, dtype=np.float32).reshape(1, 3, 3, 2)
    cols = ref.im2col(x, (2, 2))
    assert cols.shape == (1, 2, 2, 8)
    np.testing.assert_array_equal(cols[0, 0, 0], x[0, :2, :2, :].reshape(-1))


def test_conv2d_rejects_bad_shapes():
    x = np.zeros((1, 5, 5, 3), np.float32)
    with pytest.raises(ValueError, match="C=3"):
        cpu.conv2d(x, np.zeros((3, 3, 4, 8), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        cpu.conv2d(np.zeros((5, 5, 3), np.float32), np.zeros((3, 3, 3, 8), np.float32))
    with pytest.raises(ValueError, match="smaller than kernel"):
        cpu.conv2d(x, np.zeros((7, 7, 3, 8), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        cpu.conv2d(x, np.zeros((3, 3, 3, 8), np.float32), out=np.zeros((1, 3, 3, 7), np.float32))


# --- pooling -------------------------------------------------------------------------


@SETTINGS
@given(pool_geometry(), seeds)
def test_max_pool2d_matches_reference_and_torch(geometry, seed):
    N, H, W, C, kernel, stride, pad, ceil_mode, _ = geometry
    x = randn(np.random.default_rng(seed), N, H, W, C)
    expected = to_nhwc(F.max_pool2d(to_nchw(x), kernel, stride, pad, ceil_mode=ceil_mode))
    np.testing.assert_array_equal(cpu.max_pool2d(x, kernel, stride, pad, ceil_mode), expected)
    np.testing.assert_array_equal(ref.max_pool2d(x, kernel, stride, pad, ceil_mode), expected)


@SETTINGS
@given(pool_geometry(), seeds)
def test_avg_pool2d_matches_reference_and_torch(geometry, seed):
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    x = randn(np.random.default_rng(seed), N, H, W, C)
    expected = to_nhwc(F.avg_pool2d(to_nchw(x), kernel, stride, pad, ceil_mode, count_include_pad))
    close(cpu.avg_pool2d(x, kernel, stride, pad, ceil_mode, count_include_pad), expected, atol=1e-6)
    close(ref.avg_pool2d(x, kernel, stride, pad, ceil_mode, count_include_pad), expected, atol=1e-6)


@SETTINGS
@given(pool_geometry(), seeds, st.integers(0, 5), st.integers(0, 5), st.integers(0, 3))
def test_pools_read_views_as_their_contiguous_copies(geometry, seed, before, after, offset):
    """A channel slice of a wider array (a module's branch columns), also inside a flat
    buffer as the arena hands them out, is pooled through its parent; any other view
    (every other row) through a copy. Same numbers as on the contiguous copy."""
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    rng = np.random.default_rng(seed)
    width = before + C + after
    flat = randn(rng, offset + N * H * W * width + 3)                 # a buffer with room around the array
    views = [flat[offset : offset + N * H * W * width].reshape(N, H, W, width)[..., before : before + C],
             randn(rng, N, 2 * H, W, C)[:, ::2]]
    parent, c0 = runtime._channel_window(views[0])
    if np.shares_memory(parent, flat):                                # read in place: exactly x's memory
        window = parent[..., c0 : c0 + C]
        assert parent.flags.c_contiguous and window.ctypes.data == views[0].ctypes.data
        assert window.strides == views[0].strides or N * H * W * C == 1
    for x in views:
        copy = np.ascontiguousarray(x)
        np.testing.assert_array_equal(cpu.max_pool2d(x, kernel, stride, pad, ceil_mode),
                                      cpu.max_pool2d(copy, kernel, stride, pad, ceil_mode))
        mean = cpu.avg_pool2d(x, kernel, stride, pad, ceil_mode, count_include_pad)
        np.testing.assert_array_equal(mean, cpu.avg_pool2d(copy, kernel, stride, pad, ceil_mode, count_include_pad))
        close(mean, ref.avg_pool2d(copy, kernel, stride, pad, ceil_mode, count_include_pad), atol=1e-6)


@SETTINGS
@given(pool_geometry(), seeds, st.integers(0, 5), st.integers(0, 5))
def test_pools_write_into_views(geometry, seed, before, after):
    """`out` a channel slice of a wider array (a grid reduction's pool branch writes its
    slice of the module output) is written through its parent, every other channel left
    alone; any other view (every other row) gets the result copied in."""
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    rng = np.random.default_rng(seed)
    x = randn(rng, N, H, W, C)
    for pool, args in ((cpu.max_pool2d, (kernel, stride, pad, ceil_mode)),
                       (cpu.avg_pool2d, (kernel, stride, pad, ceil_mode, count_include_pad))):
        expected = pool(x, *args)
        wide = randn(rng, *expected.shape[:3], before + C + after)
        untouched = wide.copy()
        rows = randn(rng, expected.shape[0], 2 * expected.shape[1], *expected.shape[2:])
        for out in (wide[..., before : before + C], rows[:, ::2]):
            assert pool(x, *args, out=out) is out
            np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(wide[..., :before], untouched[..., :before])
        np.testing.assert_array_equal(wide[..., before + C :], untouched[..., before + C :])


def test_a_modules_pool_branch_columns_are_pooled_in_place():
    raw = randn(np.random.default_rng(3), 2, 17, 17, 768)             # Mixed_6b's fused 1x1 output
    parent, c0 = runtime._channel_window(raw[..., 576:])
    assert parent.base is raw and parent.shape == raw.shape and c0 == 576


def test_pool_stride_defaults_to_kernel_and_rejects_wide_padding():
    x = randn(np.random.default_rng(2), 1, 9, 9, 2)
    expected = to_nhwc(F.max_pool2d(to_nchw(x), 3))
    np.testing.assert_array_equal(cpu.max_pool2d(x, 3), expected)
    with pytest.raises(ValueError, match="half the kernel"):
        cpu.avg_pool2d(x, 3, 1, 2)


@pytest.mark.parametrize("where", [(0, 0), (1, 1), (2, 3)])
def test_max_pool2d_propagates_nan_like_torch(where):
    """A NaN anywhere in a window, first or last, makes that output NaN."""
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    x[(0, *where, 0)] = np.nan
    expected = to_nhwc(F.max_pool2d(to_nchw(x), 2))
    np.testing.assert_array_equal(cpu.max_pool2d(x, 2), expected)
    np.testing.assert_array_equal(ref.max_pool2d(x, 2), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 17), st.integers(1, 17), st.integers(1, 9), seeds)
def test_global_avg_pool2d(N, H, W, C, seed):
    x = randn(np.random.default_rng(seed), N, H, W, C)
    expected = to_nhwc(F.adaptive_avg_pool2d(to_nchw(x), 1))
    close(cpu.global_avg_pool2d(x), expected, atol=1e-6)
    close(ref.global_avg_pool2d(x), expected, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 20), st.integers(1, 20), st.integers(1, 6),
       st.integers(1, 6), st.integers(1, 6), seeds)
def test_adaptive_avg_pool2d_matches_torch_for_any_sizes(N, H, W, C, OH, OW, seed):
    """PyTorch's adaptive windows (overlapping where H is no multiple of OH, and OH > H too)."""
    x = randn(np.random.default_rng(seed), N, H, W, C)
    expected = to_nhwc(F.adaptive_avg_pool2d(to_nchw(x), (OH, OW)))
    close(cpu.adaptive_avg_pool2d(x, (OH, OW)), expected, atol=1e-6)
    close(ref.adaptive_avg_pool2d(x, (OH, OW)), expected, atol=1e-6)


# --- concat, linear, activations ---------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=5), st.integers(1, 6), st.integers(1, 6), seeds)
def test_concat_channels(widths, H, W, seed):
    rng = np.random.default_rng(seed)
    arrays = [randn(rng, 2, H, W, k) for k in widths]
    expected = to_nhwc(torch.cat([to_nchw(a) for a in arrays], 1))
    np.testing.assert_array_equal(cpu.concat_channels(arrays), expected)
    np.testing.assert_array_equal(ref.concat_channels(arrays), expected)


def test_concat_channels_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="expected"):
        cpu.concat_channels([np.zeros((1, 3, 3, 2), np.float32), np.zeros((1, 3, 4, 2), np.float32)])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 40), seeds)
def test_linear(N, I, O, seed):
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, N, I), randn(rng, I, O), randn(rng, O)
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(b)).numpy()
    close(cpu.linear(x, w, b), expected)
    close(ref.linear(x, w, b), expected)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(1, 300), st.integers(1, 40), seeds)
def test_linear_gives_each_row_the_same_bits_in_any_batch(N, I, O, seed):
    """A row's outputs alone, inside a batch, and with the columns split between the two
    threads of a lone image are the same bits: issue 4's determinism, by construction. (With
    numpy's matmul an image alone, a matrix-vector product, summed in another order.)"""
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, N, I), randn(rng, I, O), randn(rng, O)
    batch = cpu.linear(x, w, b)
    for i in range(N):
        np.testing.assert_array_equal(cpu.linear(x[i : i + 1], w, b), batch[i : i + 1])
        np.testing.assert_array_equal(alone(lambda: cpu.linear(x[i : i + 1], w, b)), batch[i : i + 1])
    close(batch, ref.linear(x, w, b))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 1000), seeds, st.floats(0.1, 100))
def test_softmax_and_relu(N, K, seed, scale):
    x = randn(np.random.default_rng(seed), N, K) * np.float32(scale)
    expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    close(cpu.softmax(x), expected, atol=1e-6)
    close(ref.softmax(x), expected, atol=1e-6)
    np.testing.assert_allclose(cpu.softmax(x).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(cpu.relu(x), F.relu(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(ref.relu(x), F.relu(torch.from_numpy(x)).numpy())


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), seeds)
def test_batch_norm_reference(N, H, W, C, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, N, H, W, C)
    gamma, beta, mean = randn(rng, C), randn(rng, C), randn(rng, C)
    var = rng.uniform(0.1, 2, C).astype(np.float32)
    expected = to_nhwc(F.batch_norm(to_nchw(x), *map(torch.from_numpy, (mean, var, gamma, beta)), eps=0.001))
    close(ref.batch_norm(x, gamma, beta, mean, var), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 12), st.booleans(), seeds)
def test_bias_act_on_a_channel_slice(N, H, W, K, relu, seed):
    """The epilogue reads a strided slice (a fused GEMM's columns) and writes another."""
    rng = np.random.default_rng(seed)
    wide, b = randn(rng, N, H, W, K + 5), randn(rng, K)
    x = wide[..., 2 : 2 + K]
    expected = torch.from_numpy(np.ascontiguousarray(x)) + torch.from_numpy(b)
    expected = (F.relu(expected) if relu else expected).numpy()
    out = np.zeros((N, H, W, K + 3), np.float32)
    cpu.bias_act(x, b, relu=relu, out=out[..., 3:])
    np.testing.assert_array_equal(out[..., 3:], expected)
    np.testing.assert_array_equal(ref.bias_act(x, b, relu=relu), expected)
    assert (out[..., :3] == 0).all()
    np.testing.assert_array_equal(cpu.bias_act(x, b, relu=relu), expected)          # into a new array
    tall = np.zeros((N, 2 * H, W, K), np.float32)
    cpu.bias_act(x, b, relu=relu, out=tall[:, ::2])                                 # into any other view
    np.testing.assert_array_equal(tall[:, ::2], expected)
    assert (tall[:, 1::2] == 0).all()


@pytest.mark.parametrize("scratch_floats", [1, 64, 19 * 9 * 6 * 2])
def test_conv2d_tiles_large_inputs_through_bounded_scratch(monkeypatch, scratch_floats):
    """im2col in tiles of output pixels (one pixel; a few, spanning rows; two rows; with
    a channel-slice output too): results do not depend on the tile size."""
    rng = np.random.default_rng(4)
    x, w, b = randn(rng, 2, 23, 19, 6), randn(rng, 3, 3, 6, 5), randn(rng, 5)
    whole = cpu.conv2d(x, w, b, 1, 1, relu=True)
    monkeypatch.setattr(conv, "_SCRATCH_FLOATS", scratch_floats)
    tiled = cpu.conv2d(x, w, b, 1, 1, relu=True)
    close(tiled, whole)
    close(tiled, ref.conv2d(x, w, b, 1, 1, relu=True))
    out = np.full((2, 23, 19, 8), 7.0, np.float32)
    cpu.conv2d(x, w, b, 1, 1, relu=True, out=out[..., 2:7])
    close(out[..., 2:7], whole)
    assert (out[..., :2] == 7).all() and (out[..., 7:] == 7).all()
    pointwise = randn(rng, 1, 1, 6, 5)
    close(cpu.conv2d(x, pointwise, b), ref.conv2d(x, pointwise, b))


def test_arena_recycles_only_dead_buffers():
    arena = cpu.Arena(min_bytes=0)
    a = arena.empty((2, 3, 4, 5))
    a_ptr = a.__array_interface__["data"][0]
    view = a[..., 1:3][0]                                # views of views keep the loan alive
    flat = a.reshape(-1)
    del a
    b = arena.empty((2, 3, 4, 5))
    assert b.__array_interface__["data"][0] != a_ptr     # still referenced through `view`
    del view
    assert arena.empty((2, 3, 4, 5)).__array_interface__["data"][0] != a_ptr   # and `flat`
    del flat
    c = arena.empty((4, 30))                              # same size, other shape: reused
    assert c.__array_interface__["data"][0] == a_ptr
    assert not np.shares_memory(b, c) and c.flags.c_contiguous and c.flags.writeable


def test_thread_count_from_environment_and_blas_left_alone():
    """PYINCEPT_NUM_THREADS sets pyincept's threads; no forward pass calls BLAS, so pyincept
    never limits a BLAS library's threads (NumPy's own products elsewhere keep theirs)."""
    import subprocess
    import sys

    code = (
        "import threadpoolctl, numpy as np, pyincept\n"
        "from pyincept.kernels import cpu\n"
        "blas = lambda: sorted({p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'})\n"
        "before = blas()\n"
        "pyincept.inception_v3()(np.zeros((3, 80, 80, 3), np.float32))\n"
        "pyincept.set_num_threads(1)\n"
        "print(cpu.get_num_threads(), blas() == before)\n"
    )
    env = dict(__import__("os").environ, PYINCEPT_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["1", "True"]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N", [1, 2, 5, 9])
def test_map_batch_covers_the_batch_in_order(monkeypatch, threads, N):
    """Every image exactly once, in order, in micro-batches of at most MICRO_BATCH, on up to `threads` threads."""
    from pyincept import config

    monkeypatch.setattr(config, "MICRO_BATCH", 2)
    previous = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        parts = cpu.map_batch(lambda s: (s, __import__("threading").get_ident()), N)
    finally:
        cpu.set_num_threads(previous)
    slices = [s for s, _ in parts]
    covered = [i for s in slices for i in range(N)[s]]
    assert covered == list(range(N))
    assert all(0 < s.stop - s.start <= 2 for s in slices)
    assert len({ident for _, ident in parts}) <= threads


def alone(run):
    """run() as map_batch runs a lone image on two threads: its layers split their work."""
    previous = cpu.get_num_threads()
    cpu.set_num_threads(2)
    try:
        return cpu.map_batch(lambda s: run(), 1)[0]
    finally:
        cpu.set_num_threads(previous)


def counting_helper(monkeypatch):
    """The (first, last) of every half handed to the helper thread, as a list that fills in."""
    real, started = runtime._split_helper(), []

    class Counting:
        lock = real.lock

        def start(self, work, first, last):
            started.append((first, last))
            real.start(work, first, last)

        def wait(self):
            real.wait()

    monkeypatch.setattr(runtime, "_split_helper", lambda: Counting())
    return started


def test_one_image_alone_splits_each_layer_across_two_threads(monkeypatch):
    """map_batch with one image: conv2d, conv2d_winograd and the pools hand half of their
    pixel tiles, Winograd tiles and points, or rows to a second thread, and the numbers
    are the same bits as unsplit (no product is cut another way for being split)."""
    rng = np.random.default_rng(8)
    x, b = randn(rng, 1, 17, 19, 8), randn(rng, 6)
    w3, w7, w5 = randn(rng, 3, 3, 8, 6), randn(rng, 1, 7, 8, 6), randn(rng, 5, 5, 8, 6)
    u3, u4, u7 = cpu.winograd_weights(w3, 2), cpu.winograd_weights(w3, 4), cpu.winograd_weights(w7)
    layers = [lambda x: cpu.conv2d(x, w5, b, 1, 2, relu=True), lambda x: cpu.conv2d(x, w3, b, 2, 0),
              lambda x: cpu.conv2d_winograd(x, u3, b, 1, relu=True), lambda x: cpu.conv2d_winograd(x, u4, b, 1),
              lambda x: cpu.conv2d_winograd(x, u7, b, (0, 3), relu=True, kernel_size=(1, 7)),
              lambda x: cpu.max_pool2d(x, 3, 2), lambda x: cpu.avg_pool2d(x, 3, 1, 1)]

    whole = [layer(x) for layer in layers]
    submitted = counting_helper(monkeypatch)
    monkeypatch.setattr(runtime, "_SPLIT_MIN_OPS", 0)
    for layer, expected in zip(layers, whole):
        submitted.clear()
        np.testing.assert_array_equal(alone(lambda: layer(x)), expected)
        assert submitted, "the layer gave no half away"
    monkeypatch.setattr(runtime, "_SPLIT_MIN_OPS", x.size * 9 + 1)
    for layer, expected in zip(layers[-2:], whole[-2:]):
        submitted.clear()
        np.testing.assert_array_equal(alone(lambda: layer(x)), expected)
        assert not submitted                                  # the pools are too small to split now


def test_one_image_splits_a_weight_heavy_layer_by_output_channels(monkeypatch):
    """Where K > 4x the GEMM's rows (v3's 8x8 layers), the second thread takes the upper half
    of the weight panels (output channels) instead: 1x1 and im2col, into a channel slice too,
    and the fc layer. Winograd never cuts a product: the second thread takes half of its
    n products (the Winograd points). Same bits as unsplit, and right."""
    rng = np.random.default_rng(9)
    K = 66
    x, b = randn(rng, 1, 3, 4, 8), randn(rng, K)
    w1, w3, w13 = randn(rng, 1, 1, 8, K), randn(rng, 3, 3, 8, K), randn(rng, 1, 3, 8, K)
    u3, u13 = cpu.winograd_weights(w3, 2), cpu.winograd_weights(w13, 4)
    wfc = randn(rng, 96, K)
    expected = [ref.conv2d(x, w1, b, relu=True), ref.conv2d(x, w3, b, 1, 1), ref.conv2d(x, w3, b, 1, 1, relu=True),
                ref.conv2d(x, w13, b, 1, (0, 1), relu=True), ref.linear(x.reshape(1, 96), wfc, b)]

    def layers(x):
        wide = np.full((1, 3, 4, K + 2), 7.0, np.float32)
        return [cpu.conv2d(x, w1, b, relu=True, out=wide[..., 1 : K + 1]), cpu.conv2d(x, w3, b, 1, 1),
                cpu.conv2d_winograd(x, u3, b, 1, relu=True),
                cpu.conv2d_winograd(x, u13, b, (0, 1), relu=True, kernel_size=(1, 3)),
                cpu.linear(x.reshape(1, 96), wfc, b)], wide

    unsplit, _ = layers(x)
    submitted = counting_helper(monkeypatch)
    split, wide = alone(lambda: layers(x))
    # conv2d: the upper half of its weight panels, twice; Winograd: points 8 .. 15 of F(2x2)'s
    # 16 and 3 .. 5 of F(4, 3)'s 6 (too few tiles to split the transforms); the fc: its panels.
    P = -(-K // gemm.simd().nr)
    assert submitted == [(P // 2, P), (P // 2, P), (8, 16), (3, 6), (P // 2, P)]
    assert (wide[..., 0] == 7).all() and (wide[..., -1] == 7).all()
    for a, u, e in zip(split, unsplit, expected):
        np.testing.assert_array_equal(a, u)
        close(a, e, atol=2e-5)


def test_the_helper_thread_wakes_from_sleep_and_hands_back_errors(monkeypatch):
    """After spinning SPINS reads the helper sleeps, and a later half still runs; an
    exception in the helper's half reaches the caller, and the helper goes on serving."""
    monkeypatch.setattr(runtime._Helper, "SPINS", 10)
    helper, ran = runtime._Helper(), []
    for _ in range(3):
        time.sleep(0.02)                                  # long enough for the helper to fall asleep
        assert helper.flags[helper.HELPER_ASLEEP] == 1
        helper.start(lambda a, b: (time.sleep(0.01), ran.append((a, b))), 1, 2)
        helper.wait()                                     # the caller falls asleep too, waiting
    assert ran == [(1, 2)] * 3

    def fails(a, b):
        raise ZeroDivisionError("in the helper's half")

    helper.start(fails, 0, 1)
    with pytest.raises(ZeroDivisionError, match="helper's half"):
        helper.wait()
    helper.start(lambda a, b: ran.append((a, b)), 5, 6)
    helper.wait()
    assert ran[-1] == (5, 6)


def test_two_lone_images_at_once_share_the_helper_safely():
    """Two threads each running a lone image: one splits through the helper, the other runs
    whole while it is busy; both get the right numbers."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(10)
    xs = [randn(rng, 1, 35, 35, 16) for _ in range(2)]
    w, b = randn(rng, 3, 3, 16, 24), randn(rng, 24)
    expected = [ref.conv2d(x, w, b, 1, 1, relu=True) for x in xs]
    with ThreadPoolExecutor(2) as callers:
        results = list(callers.map(lambda x: alone(lambda: [cpu.conv2d(x, w, b, 1, 1, relu=True) for _ in range(20)]),
                                   xs))
    for ys, e in zip(results, expected):
        for y in ys:
            close(y, e)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_helper_thread():
    """The parent's helper thread does not exist in a forked child: the child makes its own
    instead of waiting forever for the parent's."""
    import multiprocessing

    rng = np.random.default_rng(11)
    x, w = randn(rng, 1, 35, 35, 8), randn(rng, 3, 3, 8, 8)
    alone(lambda: cpu.conv2d(x, w, padding=1))           # the parent's helper exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        y = pool.apply_async(_conv_alone, (x, w)).get(timeout=60)
    close(y, ref.conv2d(x, w, padding=1))


def _conv_alone(x, w):
    return alone(lambda: cpu.conv2d(x, w, padding=1))
