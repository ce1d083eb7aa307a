"""Winograd convolution on the CPU: per-tile input transforms (Numba), n independent point
GEMMs as one stack (gemm.py), output transforms with bias and ReLU (Numba). The math, with the matrices,
is `reference.conv2d_winograd`; the shape letters are `cpu.py`'s.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import reference
from .geometry import conv_output_hw, pad4, pair
from .gemm import Panels, gemm_stack, pack_weights, simd
from .runtime import (
    F0, F0_25, F0_5, F1_25, F2, F2_5, F4, F4_25, F5, F5_25, F8, _as_f32, _bias_vector, _check_nhwc,
    _jit, _jit_inline, _output, _output_window, _scratch, _side_by_side, aligned_zeros,
)


# A Winograd chunk's transformed inputs and GEMM outputs together: 1M floats = 4 MB, so
# each chunk's data is still in cache when the GEMMs read it and the output transform
# reads theirs, with rows enough that each point's weights serve many tiles.
_WINOGRAD_FLOATS = 1 << 20


# --- Winograd: F(2x2, 3x3), F(4x4, 3x3), F(2x2, 5x5), F(4, 3), F(2, 7) and F(4, 7) ------
# The same convolutions as conv2d at stride 1 with fewer multiply-adds: 3x3 filters 2.25x
# (F2) or 4x (F4) fewer, 5x5 2.8x, 1x3 and 3x1 2x, 1x7 and 7x1 1.75x (F(2, 7)) or 2.8x.
# reference.conv2d_winograd is the readable version, with the math. Each has its own pair
# of transform kernels, written out coefficient by coefficient, which LLVM vectorises
# (generic matrix loops were slower than im2col itself).


def winograd_tile(in_channels, kernel_size=(3, 3)):
    """Output tile side for a layer's Winograd, by what measured faster (benchmarks/NOTES.md).
    5x5 filters have one: 2; 1x3 and 3x1: 4; 1x7 and 7x1: 4, F(4, 7). A 3x3 one's goes by
    its input channels: F(4x4) up to C=256; above, on v3's 8x8 maps, F(4x4) gives too few
    tiles and F(2x2) wins."""
    if tuple(kernel_size) != (3, 3):
        return 2 if tuple(kernel_size) == (5, 5) else 4
    return 4 if in_channels <= 256 else 2


def winograd_weights(w, tile=None):
    """Filters in the Winograd domain, packed for the point GEMMs (Panels of logical shape
    (n, C, K)): 3x3 (3, 3, C, K) -> n = 16 for tile 2, 36 for tile 4; 5x5 -> 36; 1x3 or
    3x1 -> 6; 1x7 or 7x1 -> 8 for tile 2, 10 for tile 4. tile=None: `winograd_tile`'s."""
    w = _as_f32(w)
    if tile is None:
        tile = winograd_tile(w.shape[2], w.shape[:2])
    R, S, C, K = w.shape
    path = simd()
    NR = path.nr
    P = -(-K // NR)
    # A panel's worth of output channels at a time, at most _TRANSFORM_FLOATS filter values
    # (the float64 temporaries of a whole bank, 60 MB for Mixed_7b's 3x3 at C=448, were the
    # loading peak), each written straight into its panels: no second copy of the bank.
    step = max(1, _TRANSFORM_FLOATS // (R * S * C * NR)) * NR
    data = None
    for k0 in range(0, K, step):
        block = reference.winograd_weights(w[..., k0 : k0 + step], tile)     # (n, n, C, k) or (n, C, k)
        block = block.reshape(-1, C, block.shape[-1])                      # (n, C, k)
        if data is None:
            data = aligned_zeros((len(block), P, C, NR))                  # (n, P, C, NR)
        for j in range(k0 // NR, -(-(k0 + block.shape[-1]) // NR)):
            cols = block[..., j * NR - k0 : (j + 1) * NR - k0]            # (n, C, <= NR)
            data[:, j, :, : cols.shape[-1]] = cols
    return Panels(data, (len(data), C, K), path)


_TRANSFORM_FLOATS = 1 << 17        # filter values per block of winograd_weights: float64 temporaries of ~3 MB


@_jit_inline
def _tile_at(t, TH, TW):
    """Tile t of a batch cut into TH x TW tiles per image: (image, tile row, tile column)."""
    n, q = divmod(t, TH * TW)
    th, tw = divmod(q, TW)
    return n, th, tw


@_jit_inline
def _line_at(t, T, lines):
    """Tile t of a batch of lines cut into T tiles each: (image, line, tile along the line)."""
    q, j = divmod(t, T)
    n, line = divmod(q, lines)
    return n, line, j


@_jit_inline
def _bt6(d0, d1, d2, d3, d4, d5):
    """BT d over the 6 points 0, +-1, +-2, infinity: F(4x4, 3x3), F(2x2, 5x5) and F(4, 3)."""
    return (F4 * d0 - F5 * d2 + d4, -F4 * d1 - F4 * d2 + d3 + d4, F4 * d1 - F4 * d2 - d3 + d4,
            -F2 * d1 - d2 + F2 * d3 + d4, F2 * d1 - d2 - F2 * d3 + d4, F4 * d1 - F5 * d3 + d5)


@_jit_inline
def _at4(m0, m1, m2, m3, m4, m5):
    """AT m back to 4 outputs from the same 6 points: F(4x4, 3x3) and F(4, 3)."""
    return (m0 + m1 + m2 + m3 + m4, m1 - m2 + F2 * m3 - F2 * m4, m1 + m2 + F4 * m3 + F4 * m4,
            m1 - m2 + F8 * m3 - F8 * m4 + m5)


@_jit_inline
def _at2(m0, m1, m2, m3, m4, m5):
    """AT m back to 2 outputs from the same 6 points: F(2x2, 5x5)."""
    return m0 + m1 + m2 + m3 + m4, m1 - m2 + F2 * m3 - F2 * m4 + m5


@_jit_inline
def _act(v, b, relu):
    """An output transform's epilogue for one value: v + bias, then ReLU if asked."""
    v = v + b
    return max(v, F0) if relu else v


@_jit_inline
def _load_patch(x, n, h0, w0, side, d):
    """d[a, b, :] = x[n, h0 + a, w0 + b, :] for a side x side patch d (side, side, C); zero
    outside the image."""
    N, H, W, C = x.shape
    for a in range(side):
        ih = h0 + a
        for b in range(side):
            iw = w0 + b
            if 0 <= ih < H and 0 <= iw < W:
                for c in range(C):
                    d[a, b, c] = x[n, ih, iw, c]
            else:
                for c in range(C):
                    d[a, b, c] = 0.0


@_jit_inline
def _store_row(y, n, oh, w0, out, d0):
    """out[n, oh, w0 + q, d0 : d0 + K] = y[q, :] for one row of a tile's outputs y (side, K);
    a row past the bottom edge, and outputs past the right one, are dropped. out is C
    contiguous, with the layer's K channels from d0 (`_channel_window`): a branch writing
    into its module's output stores 1.2-2.5x faster than through the slice itself."""
    N, OH, OW, _ = out.shape
    K = y.shape[1]
    if oh < OH:
        for q in range(min(y.shape[0], OW - w0)):
            dst = out[n, oh, w0 + q, d0 : d0 + K]                              # (K,)
            for k in range(K):
                dst[k] = y[q, k]


@_jit
def _winograd_input(x, top, left, TH, TW, t0, v, first, last):
    """v[4a + b, t, c] = (BT d B)[a, b] for tiles t0 .. t0+T-1, d the 4x4 patch of channel c.

    Tile t is image n = t // (TH*TW), tile row th, column tw; its patch starts at input
    row 2*th - top, column 2*tw - left (zero outside the image).
    """
    C = x.shape[3]
    d = np.empty((4, 4, C), np.float32)                 # the patch
    e = np.empty((4, 4, C), np.float32)                 # BT d
    for i in range(first, last):
        n, th, tw = _tile_at(t0 + i, TH, TW)
        _load_patch(x, n, 2 * th - top, 2 * tw - left, 4, d)
        # BT d (rows), then (BT d) B (columns); each loop runs along the contiguous channels.
        for b in range(4):
            for c in range(C):
                d0, d1, d2, d3 = d[0, b, c], d[1, b, c], d[2, b, c], d[3, b, c]
                e[0, b, c] = d0 - d2
                e[1, b, c] = d1 + d2
                e[2, b, c] = d2 - d1
                e[3, b, c] = d1 - d3
        for a in range(4):
            for c in range(C):
                e0, e1, e2, e3 = e[a, 0, c], e[a, 1, c], e[a, 2, c], e[a, 3, c]
                v[4 * a + 0, i, c] = e0 - e2
                v[4 * a + 1, i, c] = e1 + e2
                v[4 * a + 2, i, c] = e2 - e1
                v[4 * a + 3, i, c] = e1 - e3


@_jit
def _winograd_output(m, bias, relu, TH, TW, t0, out, d0, first, last):
    """out[n, 2*th + p, 2*tw + q, k] = max(0, (AT M A)[p, q] + bias[k]) for tiles t0 .., where
    M[a, b] = m[4a + b, t, k]; outputs past the bottom or right edge are dropped."""
    K = bias.shape[0]
    y = np.empty((2, 2, K), np.float32)                 # the tile's 2x2 outputs
    for i in range(first, last):
        n, th, tw = _tile_at(t0 + i, TH, TW)
        for k in range(K):
            # AT M: two rows                   then (AT M) A: two columns
            s00 = m[0, i, k] + m[4, i, k] + m[8, i, k]
            s01 = m[1, i, k] + m[5, i, k] + m[9, i, k]
            s02 = m[2, i, k] + m[6, i, k] + m[10, i, k]
            s03 = m[3, i, k] + m[7, i, k] + m[11, i, k]
            s10 = m[4, i, k] - m[8, i, k] - m[12, i, k]
            s11 = m[5, i, k] - m[9, i, k] - m[13, i, k]
            s12 = m[6, i, k] - m[10, i, k] - m[14, i, k]
            s13 = m[7, i, k] - m[11, i, k] - m[15, i, k]
            b = bias[k]
            y[0, 0, k], y[0, 1, k] = _act(s00 + s01 + s02, b, relu), _act(s01 - s02 - s03, b, relu)
            y[1, 0, k], y[1, 1, k] = _act(s10 + s11 + s12, b, relu), _act(s11 - s12 - s13, b, relu)
        _store_row(y[0], n, 2 * th, 2 * tw, out, d0)
        _store_row(y[1], n, 2 * th + 1, 2 * tw, out, d0)


@_jit
def _winograd4_input(x, step, top, left, TH, TW, t0, v, first, last):
    """F(4x4, 3x3) (step 4) and F(2x2, 5x5) (step 2), which share their 6x6 patches and BT:
    v[6a + b, t, c] = (BT d B)[a, b] for tiles t0 .., d the 6x6 patch of channel c starting
    at input row step*th - top, column step*tw - left (zero outside the image).

    BT runs down the columns of a whole tile row at once, along its six input rows'
    W*C contiguous values, into e (long loops, which LLVM vectorises); then each tile's
    B runs along e's rows, a pixel's C channels at a time: patch by patch would transform
    the columns neighbouring patches share twice. The views are written out inline.
    """
    N, H, W, C = x.shape
    rows = x.reshape(N, H, W * C)                       # an image row as W*C values
    zero, zc = np.zeros(W * C, np.float32), np.zeros(C, np.float32)   # a padding row, a padding pixel
    e = np.empty((6, W * C), np.float32)                # BT d for every column of one tile row
    e0, e1, e2, e3, e4, e5 = e[0], e[1], e[2], e[3], e[4], e[5]
    for i in range(first, last):
        n, th, tw = _tile_at(t0 + i, TH, TW)
        if i == first or tw == 0:                       # a new tile row: BT down its 6 input rows
            h0 = step * th - top
            r0 = rows[n, h0] if 0 <= h0 < H else zero
            r1 = rows[n, h0 + 1] if 0 <= h0 + 1 < H else zero
            r2 = rows[n, h0 + 2] if 0 <= h0 + 2 < H else zero
            r3 = rows[n, h0 + 3] if 0 <= h0 + 3 < H else zero
            r4 = rows[n, h0 + 4] if 0 <= h0 + 4 < H else zero
            r5 = rows[n, h0 + 5] if 0 <= h0 + 5 < H else zero
            for q in range(W * C):
                e0[q], e1[q], e2[q], e3[q], e4[q], e5[q] = _bt6(r0[q], r1[q], r2[q], r3[q], r4[q], r5[q])
        w0 = step * tw - left                           # the patch's first column
        for a in range(6):                              # (BT d) B along row a of e
            ea = e[a]
            q0 = ea[w0 * C : (w0 + 1) * C] if 0 <= w0 < W else zc
            q1 = ea[(w0 + 1) * C : (w0 + 2) * C] if 0 <= w0 + 1 < W else zc
            q2 = ea[(w0 + 2) * C : (w0 + 3) * C] if 0 <= w0 + 2 < W else zc
            q3 = ea[(w0 + 3) * C : (w0 + 4) * C] if 0 <= w0 + 3 < W else zc
            q4 = ea[(w0 + 4) * C : (w0 + 5) * C] if 0 <= w0 + 4 < W else zc
            q5 = ea[(w0 + 5) * C : (w0 + 6) * C] if 0 <= w0 + 5 < W else zc
            v0, v1, v2 = v[6 * a, i], v[6 * a + 1, i], v[6 * a + 2, i]
            v3, v4, v5 = v[6 * a + 3, i], v[6 * a + 4, i], v[6 * a + 5, i]
            for c in range(C):
                v0[c], v1[c], v2[c], v3[c], v4[c], v5[c] = _bt6(q0[c], q1[c], q2[c], q3[c], q4[c], q5[c])


@_jit
def _winograd4_output(m, bias, relu, TH, TW, t0, out, d0, first, last):
    """F(4x4, 3x3): out[n, 4*th + p, 4*tw + q, k] = max(0, (AT M A)[p, q] + bias[k]), where
    M[a, b] = m[6a + b, t, k]; outputs past the bottom or right edge are dropped.

    Here and in _winograd5_output the inner loops index (K,) rows (m[e, i]: one Winograd
    point of a tile, all its channels) and one output row is finished and stored at a
    time: with 3-D indexing and the whole tile buffered they ran 2.6x slower."""
    K = bias.shape[0]
    s = np.empty((4, 6, K), np.float32)                 # AT M
    y = np.empty((4, K), np.float32)                    # one row of the tile's 4x4 outputs
    for i in range(first, last):
        n, th, tw = _tile_at(t0 + i, TH, TW)
        for b in range(6):
            m0, m1, m2, m3, m4, m5 = m[b, i], m[6 + b, i], m[12 + b, i], m[18 + b, i], m[24 + b, i], m[30 + b, i]
            s0, s1, s2, s3 = s[0, b], s[1, b], s[2, b], s[3, b]
            for k in range(K):
                s0[k], s1[k], s2[k], s3[k] = _at4(m0[k], m1[k], m2[k], m3[k], m4[k], m5[k])
        for p in range(4):
            r0, r1, r2, r3, r4, r5 = s[p, 0], s[p, 1], s[p, 2], s[p, 3], s[p, 4], s[p, 5]
            for k in range(K):
                y0, y1, y2, y3 = _at4(r0[k], r1[k], r2[k], r3[k], r4[k], r5[k])
                b = bias[k]
                y[0, k], y[1, k] = _act(y0, b, relu), _act(y1, b, relu)
                y[2, k], y[3, k] = _act(y2, b, relu), _act(y3, b, relu)
            _store_row(y, n, 4 * th + p, 4 * tw, out, d0)


@_jit
def _winograd5_output(m, bias, relu, TH, TW, t0, out, d0, first, last):
    """F(2x2, 5x5): out[n, 2*th + p, 2*tw + q, k] = max(0, (AT M A)[p, q] + bias[k]), where
    M[a, b] = m[6a + b, t, k]; outputs past the bottom or right edge are dropped."""
    K = bias.shape[0]
    s = np.empty((2, 6, K), np.float32)                 # AT M
    y = np.empty((2, K), np.float32)                    # one row of the tile's 2x2 outputs
    for i in range(first, last):
        n, th, tw = _tile_at(t0 + i, TH, TW)
        for b in range(6):
            m0, m1, m2, m3, m4, m5 = m[b, i], m[6 + b, i], m[12 + b, i], m[18 + b, i], m[24 + b, i], m[30 + b, i]
            s0, s1 = s[0, b], s[1, b]
            for k in range(K):
                s0[k], s1[k] = _at2(m0[k], m1[k], m2[k], m3[k], m4[k], m5[k])
        for p in range(2):
            r0, r1, r2, r3, r4, r5 = s[p, 0], s[p, 1], s[p, 2], s[p, 3], s[p, 4], s[p, 5]
            for k in range(K):
                y0, y1 = _at2(r0[k], r1[k], r2[k], r3[k], r4[k], r5[k])
                y[0, k], y[1, k] = _act(y0, bias[k], relu), _act(y1, bias[k], relu)
            _store_row(y, n, 2 * th + p, 2 * tw, out, d0)


@_jit_inline
def _load_line(x, along_w, n, line, p0, d):
    """d[a, :] = the pixel at position p0 + a of line `line` of image n, for a < len(d): along
    W (x[n, line, p0 + a]) or along H (x[n, p0 + a, line]); zero outside the image."""
    N, H, W, C = x.shape
    length = W if along_w else H
    for a in range(d.shape[0]):
        p = p0 + a
        if 0 <= p < length:
            h, w = (line, p) if along_w else (p, line)
            src = x[n, h, w]                                                  # (C,), contiguous
            for c in range(C):
                d[a, c] = src[c]
        else:
            for c in range(C):
                d[a, c] = 0.0


@_jit_inline
def _store_line(y, along_w, n, line, o0, out, d0):
    """The other way: out's pixel o0 + a of the line = y[a, :], into channels d0 .. d0+K-1
    of a C-contiguous out (as `_store_row`); those past the end are dropped."""
    N, OH, OW, _ = out.shape
    K = y.shape[1]
    for a in range(min(y.shape[0], (OW if along_w else OH) - o0)):
        h, w = (line, o0 + a) if along_w else (o0 + a, line)
        dest = out[n, h, w, d0 : d0 + K]
        for k in range(K):
            dest[k] = y[a, k]


@_jit
def _winograd7_input(x, along_w, pad0, T, t0, v, first, last):
    """F(2, 7): v[a, t, c] = (BT d)[a] for tiles t0 .., d the 8 inputs of channel c under tile t.

    Lines run along W (along_w, a 1x7 filter) or H (7x1); tile t is line t // T of the
    batch, tile j = t % T of it, whose inputs start at position 2*j - pad0 (zero outside).
    """
    N, H, W, C = x.shape
    lines = H if along_w else W
    d = np.empty((8, C), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        _load_line(x, along_w, n, line, 2 * j - pad0, d)
        for c in range(C):
            d0, d1, d2, d3, d4, d5, d6, d7 = d[0, c], d[1, c], d[2, c], d[3, c], d[4, c], d[5, c], d[6, c], d[7, c]
            v[0, i, c] = d0 - F5_25 * d2 + F5_25 * d4 - d6
            v[1, i, c] = -d1 - d2 + F4_25 * d3 + F4_25 * d4 - d5 - d6
            v[2, i, c] = d1 - d2 - F4_25 * d3 + F4_25 * d4 + d5 - d6
            v[3, i, c] = F0_5 * d1 + F0_25 * d2 - F2_5 * d3 - F1_25 * d4 + F2 * d5 + d6
            v[4, i, c] = -F0_5 * d1 + F0_25 * d2 + F2_5 * d3 - F1_25 * d4 - F2 * d5 + d6
            v[5, i, c] = F2 * d1 + F4 * d2 - F2_5 * d3 - F5 * d4 + F0_5 * d5 + d6
            v[6, i, c] = -F2 * d1 + F4 * d2 + F2_5 * d3 - F5 * d4 - F0_5 * d5 + d6
            v[7, i, c] = d1 - F5_25 * d3 + F5_25 * d5 - d7


@_jit
def _winograd7_output(m, bias, relu, along_w, T, t0, out, d0, first, last):
    """F(2, 7): the tile's 2 outputs along its line, (AT M)[p] + bias, ReLU; past the end dropped."""
    N, OH, OW, _ = out.shape
    K = bias.shape[0]
    lines = OH if along_w else OW
    y = np.empty((2, K), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        for k in range(K):
            y0 = m[0, i, k] + m[1, i, k] + m[2, i, k] + m[3, i, k] + m[4, i, k] + m[5, i, k] + m[6, i, k]
            y1 = (m[1, i, k] - m[2, i, k] + F2 * m[3, i, k] - F2 * m[4, i, k]
                  + F0_5 * m[5, i, k] - F0_5 * m[6, i, k] - m[7, i, k])
            y[0, k], y[1, k] = _act(y0, bias[k], relu), _act(y1, bias[k], relu)
        _store_line(y, along_w, n, line, 2 * j, out, d0)


# F(4, 7)'s coefficients (reference.WINOGRAD_7_4): BT's, integers, and AT's, powers of
# its points 2, 1/2 and 3/4.
F9, F12, F16, F18, F32, F36, F61, F63, F64, F72, F84, F89 = (np.float32(c) for c in (
    9, 12, 16, 18, 32, 36, 61, 63, 64, 72, 84, 89))
F109, F116, F122, F128, F178, F217, F218, F232, F253, F308, F372, F525 = (np.float32(c) for c in (
    109, 116, 122, 128, 178, 217, 218, 232, 253, 308, 372, 525))
F0_125, F0_75, F0_5625, F0_421875 = (np.float32(c) for c in (1 / 8, 3 / 4, 9 / 16, 27 / 64))


@_jit
def _winograd7x4_input(x, along_w, pad0, T, t0, v, first, last):
    """F(4, 7): v[a, t, c] = (BT d)[a], d the 10 inputs of channel c under tile t, which
    starts at position 4*j - pad0 of its line (as _winograd7_input).

    Rows 1-8 come in pairs, one per pair of points +-q: row(+q) = e + o and row(-q) = e - o,
    e over the even inputs and o over the odd ones (reference.WINOGRAD_7_4).
    """
    N, H, W, C = x.shape
    lines = H if along_w else W
    d = np.empty((10, C), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        _load_line(x, along_w, n, line, 4 * j - pad0, d)
        # Two loops over c, five rows each: as one loop of all ten rows LLVM did not
        # vectorise it (too many rows to check for overlap) and it ran 4-6x slower.
        for c in range(C):
            d0, d1, d2, d3, d4, d5, d6, d7, d8 = (d[0, c], d[1, c], d[2, c], d[3, c], d[4, c],
                                                  d[5, c], d[6, c], d[7, c], d[8, c])
            v[0, i, c] = F36 * d0 - F253 * d2 + F525 * d4 - F372 * d6 + F64 * d8
            e = -F36 * d2 + F217 * d4 - F308 * d6 + F64 * d8                        # points +-1
            o = -F36 * d1 + F217 * d3 - F308 * d5 + F64 * d7
            v[1, i, c], v[2, i, c] = e + o, e - o
            e = -F9 * d2 + F61 * d4 - F116 * d6 + F64 * d8                          # +-2
            o = -F18 * d1 + F122 * d3 - F232 * d5 + F128 * d7
            v[3, i, c], v[4, i, c] = e + o, e - o
        for c in range(C):
            d1, d2, d3, d4, d5, d6, d7, d8, d9 = (d[1, c], d[2, c], d[3, c], d[4, c], d[5, c],
                                                  d[6, c], d[7, c], d[8, c], d[9, c])
            e = -F72 * d2 + F218 * d4 - F178 * d6 + F32 * d8                        # +-1/2
            o = -F36 * d1 + F109 * d3 - F89 * d5 + F16 * d7
            v[5, i, c], v[6, i, c] = e + o, e - o
            e = -F16 * d2 + F84 * d4 - F84 * d6 + F16 * d8                          # +-3/4
            o = -F12 * d1 + F63 * d3 - F63 * d5 + F12 * d7
            v[7, i, c], v[8, i, c] = e + o, e - o
            v[9, i, c] = F36 * d1 - F253 * d3 + F525 * d5 - F372 * d7 + F64 * d9


@_jit
def _winograd7x4_output(m, bias, relu, along_w, T, t0, out, d0, first, last):
    """F(4, 7): the tile's 4 outputs along its line, (AT M)[p] + bias, ReLU; past the end
    dropped. AT's columns pair up as BT's rows do: sums s and differences t of each pair."""
    N, OH, OW, _ = out.shape
    K = bias.shape[0]
    lines = OH if along_w else OW
    y = np.empty((4, K), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        for k in range(K):
            s1, t1 = m[1, i, k] + m[2, i, k], m[1, i, k] - m[2, i, k]                # points +-1
            s2, t2 = m[3, i, k] + m[4, i, k], m[3, i, k] - m[4, i, k]                # +-2
            s3, t3 = m[5, i, k] + m[6, i, k], m[5, i, k] - m[6, i, k]                # +-1/2
            s4, t4 = m[7, i, k] + m[8, i, k], m[7, i, k] - m[8, i, k]                # +-3/4
            b = bias[k]
            y[0, k] = _act(m[0, i, k] + s1 + s2 + s3 + s4, b, relu)
            y[1, k] = _act(t1 + F2 * t2 + F0_5 * t3 + F0_75 * t4, b, relu)
            y[2, k] = _act(s1 + F4 * s2 + F0_25 * s3 + F0_5625 * s4, b, relu)
            y[3, k] = _act(t1 + F8 * t2 + F0_125 * t3 + F0_421875 * t4 + m[9, i, k], b, relu)
        _store_line(y, along_w, n, line, 4 * j, out, d0)


@_jit
def _winograd3_input(x, along_w, pad0, T, t0, v, first, last):
    """F(4, 3) for 1x3 and 3x1 filters: v[a, t, c] = (BT d)[a], d the 6 inputs of channel c
    under tile t, which starts at position 4*j - pad0 of its line (as _winograd7_input)."""
    N, H, W, C = x.shape
    lines = H if along_w else W
    d = np.empty((6, C), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        _load_line(x, along_w, n, line, 4 * j - pad0, d)
        for c in range(C):
            v[0, i, c], v[1, i, c], v[2, i, c], v[3, i, c], v[4, i, c], v[5, i, c] = _bt6(
                d[0, c], d[1, c], d[2, c], d[3, c], d[4, c], d[5, c])


@_jit
def _winograd3_output(m, bias, relu, along_w, T, t0, out, d0, first, last):
    """F(4, 3): the tile's 4 outputs along its line, (AT M)[p] + bias, ReLU; past the end dropped."""
    N, OH, OW, _ = out.shape
    K = bias.shape[0]
    lines = OH if along_w else OW
    y = np.empty((4, K), np.float32)
    for i in range(first, last):
        n, line, j = _line_at(t0 + i, T, lines)
        for k in range(K):
            y0, y1, y2, y3 = _at4(m[0, i, k], m[1, i, k], m[2, i, k], m[3, i, k], m[4, i, k], m[5, i, k])
            b = bias[k]
            y[0, k], y[1, k] = _act(y0, b, relu), _act(y1, b, relu)
            y[2, k], y[3, k] = _act(y2, b, relu), _act(y3, b, relu)
        _store_line(y, along_w, n, line, 4 * j, out, d0)


def conv2d_winograd(x, u, bias=None, padding=0, relu=False, out=None, kernel_size=(3, 3)):
    """A stride-1 convolution by Winograd; u = winograd_weights(w, tile) for w of kernel_size
    (Panels; a plain (n, C, K) bank is packed here).

    3x3: (16, C, K) runs F(2x2, 3x3), (36, C, K) runs F(4x4, 3x3). 5x5: (36, C, K) runs
    F(2x2, 5x5). 1x3 and 3x1: (6, C, K) runs F(4, 3), and 1x7 and 7x1: (8, C, K) runs
    F(2, 7), (10, C, K) F(4, 7), along the filter's axis, which is the only one these may pad.
    Same contract as conv2d(x, w, bias, 1, padding, relu, out). The batch's tiles, all images
    together, are cut into chunks that fit _WINOGRAD_FLOATS. Per chunk: input transform into
    v (n, T, C), n point GEMMs v[e] @ u[e] into m (n, T, P*NR) (kernels/gemm.py: one FMA
    chain per output, so a tile's bits do not depend on its chunk), output transform with
    bias and ReLU straight into `out`.
    """
    x = _check_nhwc(x, "x")
    u = pack_weights(u)
    N = x.shape[0]
    g = _geometry(x.shape, u.shape, _hashable(padding), _hashable(kernel_size))
    n, C, K = u.shape
    bias = _bias_vector(bias, K)
    out = _output(out, (N, g.OH, g.OW, K))
    window = _output_window(out)
    if window is None:
        np.copyto(out, conv2d_winograd(x, u, bias, padding, relu, None, kernel_size))
        return out
    parent, d0 = window                                                # out is parent[..., d0 : d0 + K]
    kernel_in, kernel_out = g.kernels
    if g.along_w is not None:                                          # along one axis: F(4, 3), F(2, 7) or F(4, 7)
        along_w, pad0, T = g.along_w, g.pad0, g.T
        transform_in = lambda t0, v, a, b: kernel_in(x, along_w, pad0, T, t0, v, a, b)                  # noqa: E731
        transform_out = lambda t0, m, a, b: kernel_out(m, bias, relu, along_w, T, t0, parent, d0, a, b)  # noqa: E731
    else:                                                              # F(m x m, 3x3) or F(2x2, 5x5)
        top, left, TH, TW, tile = g.top, g.left, g.TH, g.TW, g.tile
        if n == 16:                                                    # F(2x2, 3x3): 4x4 patches
            transform_in = lambda t0, v, a, b: kernel_in(x, top, left, TH, TW, t0, v, a, b)             # noqa: E731
        else:                                                          # 6x6 patches, every tile-th pixel
            transform_in = lambda t0, v, a, b: kernel_in(x, tile, top, left, TH, TW, t0, v, a, b)       # noqa: E731
        transform_out = lambda t0, m, a, b: kernel_out(m, bias, relu, TH, TW, t0, parent, d0, a, b)      # noqa: E731
    path = u.path
    width = u.data.shape[1] * path.nr                                  # P*NR: m's rows hold whole panels
    bounds = _winograd_chunks(N * g.per_image, n * (C + width), path.rows)

    def points(v, m, e0, e1):
        """The GEMMs of Winograd points e0 .. e1-1: v[e] (T, C) @ u[e] (C, K) into m[e]."""
        gemm_stack(v, u, m, e0, e1)

    if len(bounds) == 2:
        # One chunk (every layer from 35x35 down, a lone image or a few): a lone image's two
        # threads share it in three steps: half the tiles' input transforms each, then half
        # the n products (Winograd points) each, then half the output transforms.
        count = bounds[1]
        v = _scratch("wino_v", (n, count, C))
        m = _scratch("wino_m", (n, count, width))
        _side_by_side(lambda a, b: transform_in(0, v, a, b), count)
        _side_by_side(lambda a, b: points(v, m, a, b), n, smallest=2)
        _side_by_side(lambda a, b: transform_out(0, m, a, b), count)
        return out

    def chunks(i0, i1):
        """Transform, n GEMMs and transform back for chunks i0 .. i1-1."""
        for i in range(i0, i1):
            t0, count = bounds[i], bounds[i + 1] - bounds[i]
            v = _scratch("wino_v", (n, count, C))
            m = _scratch("wino_m", (n, count, width))
            transform_in(t0, v, 0, count)
            points(v, m, 0, n)
            transform_out(t0, m, 0, count)

    _side_by_side(chunks, len(bounds) - 1, smallest=2)
    return out


class _Geometry(NamedTuple):
    """What conv2d_winograd works out from shapes alone, once per layer and input size."""
    OH: int
    OW: int
    kernels: tuple         # (input transform, output transform)
    along_w: object        # one-axis filters: True along W (1xS), False along H (Rx1); None for RxR
    pad0: int              # one-axis filters: padding before the first input
    T: int                 # one-axis filters: tiles per line
    top: int
    left: int
    TH: int                # RxR filters: tile rows and columns per image, and the tile's side
    TW: int
    tile: int
    per_image: int         # one image's tiles


_WINOGRAD_SIZES = {(3, 3): (16, 36), (5, 5): (36,), (1, 3): (6,), (3, 1): (6,), (1, 7): (8, 10), (7, 1): (8, 10)}


def _hashable(value):
    """A padding or kernel size as a cache key: lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=1024)
def _geometry(x_shape, u_shape, padding, kernel_size):
    """conv2d_winograd's checks and shape arithmetic, cached: the same layer on the same
    input size asks again on every call, and at batch 1 the Python of a call is time the
    helper thread waits."""
    R, S = pair(kernel_size)
    if (R, S) not in _WINOGRAD_SIZES:
        raise ValueError(f"Winograd here serves 3x3, 5x5, 1x3, 3x1, 1x7 and 7x1 filters, got {(R, S)}")
    sizes = _WINOGRAD_SIZES[R, S]
    if len(u_shape) != 3 or u_shape[0] not in sizes or u_shape[1] != x_shape[3]:
        raise ValueError(f"Winograd weights for {R}x{S} must be ({' or '.join(map(str, sizes))}, "
                         f"C={x_shape[3]}, K), got {u_shape}")
    n, C, K = u_shape
    top, bottom, left, right = pad4(padding)
    if (R == 1 and S > 1 and (top or bottom)) or (S == 1 and R > 1 and (left or right)):
        raise ValueError(f"a {R}x{S} Winograd filter pads only along its own axis, got {(top, bottom, left, right)}")
    N, H, W, _ = x_shape
    OH, OW = conv_output_hw(H, W, (R, S), 1, (top, bottom, left, right))
    along_w = pad0 = T = TH = TW = tile = None
    if 1 in (R, S):                                                    # along one axis
        along_w = R == 1
        *kernels, step = {6: (_winograd3_input, _winograd3_output, 4),
                          8: (_winograd7_input, _winograd7_output, 2),
                          10: (_winograd7x4_input, _winograd7x4_output, 4)}[n]
        T = -(-(OW if along_w else OH) // step)                        # tiles per line
        per_image = (H if along_w else W) * T
        pad0 = left if along_w else top
    else:
        tile = 4 if (R, n) == (3, 36) else 2
        TH, TW = -(-OH // tile), -(-OW // tile)
        per_image = TH * TW
        kernels = (_winograd_input if n == 16 else _winograd4_input,
                   {16: _winograd_output, 36: _winograd4_output if R == 3 else _winograd5_output}[n])
    return _Geometry(OH, OW, tuple(kernels), along_w, pad0, T, top, left, TH, TW, tile, per_image)


def _winograd_chunks(tiles, floats_per_tile, MR):
    """Tile bounds of a batch's Winograd chunks: as few as fit _WINOGRAD_FLOATS, and an even
    number where there are several, so that a lone image's two threads take half each;
    each a whole number of micro-kernel rows but the last."""
    pieces = max(1, -(-tiles * floats_per_tile // _WINOGRAD_FLOATS))
    if pieces > 1:
        pieces += pieces % 2
    step = -(-(-(-tiles // pieces)) // MR) * MR
    return tuple(range(0, tiles, step)) + (tiles,)
