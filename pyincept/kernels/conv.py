"""Convolution on the CPU: im2col (Numba) + one matrix product per piece (BLAS), with the
bias and ReLU epilogue and the fused 1x1's heads applied while each piece is in cache.
The readable twin is `reference.conv2d`; the shape letters are `cpu.py`'s.
"""

import numpy as np

from .geometry import conv_output_hw, pad4, pair
from .runtime import (
    _SIDE_BY_SIDE_MIN, _as_f32, _bias_vector, _channel_window, _check_nhwc, _jit, _output,
    _output_window, _scratch, _side_by_side, _single_threaded,
)
from .dense import _finish_in_place, _finish_rows, _linear_columns, _pixels, bias_act


# --- convolution ------------------------------------------------------------------


@_jit
def _unfold(x, R, S, sh, sw, top, left, OH, OW, p0, cols):
    """im2col for output pixels p0 .. p0+m-1 of the whole batch (m = len(cols)).

    Pixel p is image n = p // (OH*OW), output row oh, column ow, so a tile may span
    images. cols[i, (r*S + s)*C + c] = x[n, oh*sh - top + r, ow*sw - left + s, c], zero
    outside the image: padding is never materialised. A window wholly inside the image
    copies each of its R rows as one run of S*C contiguous values (Conv2d_1a, C=3: 2x
    faster than pixel by pixel); a window over the edge goes pixel by pixel.
    """
    N, H, W, C = x.shape
    SC = S * C
    rows = x.reshape(N, H, W * C)                       # an image row as one run of values
    for i in range(cols.shape[0]):
        n, q = divmod(p0 + i, OH * OW)
        oh, ow = divmod(q, OW)
        ih0, iw0 = oh * sh - top, ow * sw - left
        if ih0 >= 0 and ih0 + R <= H and iw0 >= 0 and iw0 + S <= W:
            for r in range(R):
                src = rows[n, ih0 + r, iw0 * C : iw0 * C + SC]
                dst = cols[i, r * SC : r * SC + SC]
                for j in range(SC):
                    dst[j] = src[j]
            continue
        for r in range(R):
            ih = ih0 + r
            for s in range(S):
                iw = iw0 + s
                base = (r * S + s) * C
                if 0 <= ih < H and 0 <= iw < W:
                    for c in range(C):
                        cols[i, base + c] = x[n, ih, iw, c]
                else:
                    for c in range(C):
                        cols[i, base + c] = 0.0


@_single_threaded
def conv2d(x, w, bias=None, stride=1, padding=0, relu=False, out=None, heads=()):
    """Convolution as im2col + GEMM. x (N,H,W,C), w (R,S,C,K), bias (K,) -> (N,OH,OW,K).

    padding: an int, (pad_h, pad_w) or per side (top, bottom, left, right).
    relu: apply max(0, .) after the bias (the folded BasicConv2d epilogue).
    out: optional (N,OH,OW,K) float32 array to write into, e.g. a channel slice of a
         concat buffer.
    heads: epilogues of column ranges of the raw product (no bias or relu of its own),
         for the members of a fused 1x1 (fusion.Pointwise1x1): each (k0, bias_i, relu_i, dst)
         writes y[..., k0 : k0 + len(bias_i)] + bias_i, ReLU if relu_i, into dst.

    Each image's product (OH*OW rows) is cut into the pieces `_gemm_pieces` gives it:
    tiles of its output pixels, at most _SCRATCH_FLOATS unfolded values each, or two
    halves of its output channels. Each piece is unfolded (im2col) into a scratch matrix
    reused across pieces and calls, multiplied by the (R*S*C, K) weights straight into
    `out` (when `out` is contiguous), and finished (bias, ReLU) while it is still in
    cache. A 1x1 stride-1 convolution skips the unfolding: its input already is the
    (N*H*W, C) matrix. The heads run on the same pieces, also in cache, on both threads
    of a lone image, instead of as bias_act calls after the product.
    """
    x = _check_nhwc(x, "x")
    w = _as_f32(w)
    if w.ndim != 4 or w.shape[2] != x.shape[3]:
        raise ValueError(f"weights must be (R, S, C={x.shape[3]}, K), got {w.shape}")
    R, S, C, K = w.shape
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, _ = x.shape
    OH, OW = conv_output_hw(H, W, (R, S), (sh, sw), (top, bottom, left, right))
    finish = bias is not None or relu                                  # else the GEMM is all (a fused 1x1's raw columns)
    if heads and finish:
        raise ValueError("heads take the raw product: give the conv no bias or relu of its own")
    heads, late = _head_windows(heads, (N, OH, OW), K)
    bias = _bias_vector(bias, K)
    out = _output(out, (N, OH, OW, K))
    D = R * S * C
    wmat = w.reshape(D, K)                                             # (D = R*S*C, K)
    out2d = _pixels(out)                                               # (N*OH*OW, K)
    P = OH * OW                                                        # one image's rows
    pointwise = (R, S, sh, sw, top, bottom, left, right) == (1, 1, 1, 1, 0, 0, 0, 0)
    x2d = x.reshape(N * P, C) if pointwise else None
    parent, c0 = _channel_window(out)
    whole = _pixels(parent)                                            # out2d is whole[:, c0 : c0 + K]

    def unfolded(p0, m):
        """Rows p0 .. p0+m-1 of the (N*OH*OW, R*S*C) im2col matrix: a view for a 1x1, else unfolded."""
        if pointwise:
            return x2d[p0 : p0 + m]                                    # (m, C): no unfolding
        cols = _scratch("cols", (m, D))                                # (m, R*S*C)
        _unfold(x, R, S, sh, sw, top, left, OH, OW, p0, cols)
        return cols

    def finish_columns(p0, p1, k0, k1):
        """Bias, ReLU and the heads for rows p0 .. p1-1, columns k0 .. k1-1 of the product in out."""
        if finish:
            _finish_rows(whole, c0 + k0, bias[k0:k1], relu, whole, c0 + k0, p0, p1)
        for h0, h_bias, h_relu, h_rows, h_d0 in heads:                 # the heads' columns among k0 .. k1-1
            a, b = max(h0, k0), min(h0 + len(h_bias), k1)
            if a < b:
                _finish_rows(whole, c0 + a, h_bias[a - h0 : b - h0], h_relu, h_rows, h_d0 + a - h0, p0, p1)

    if P == 1:
        # One output pixel per image (the aux head's 5x5 conv of a 5x5 map): each row is an
        # image, multiplied by `_linear_columns`, whose sums run in a fixed order, so every
        # image's row is the same bits in any batch and any split of the columns.
        cols = unfolded(0, N)                                          # (N, R*S*C)

        def columns(k0, k1):
            _linear_columns(cols, wmat, out2d, k0, k1)                 # (N, k1-k0)
            finish_columns(0, N, k0, k1)

        _side_by_side(columns, K)
        _late_heads(late, out)
        return out

    rows, cuts = _gemm_pieces(P, K, D)
    if len(cuts) > 2:                                                  # by output channels: all rows at once
        group = max(1, _SCRATCH_FLOATS // (P * D))                     # images unfolded at once
        for n0 in range(0, N, group):
            images = range(n0, min(N, n0 + group))
            cols = unfolded(n0 * P, len(images) * P)                   # (images * P, R*S*C)

            def columns(i0, i1, images=images, cols=cols):
                """GEMM and epilogue of column pieces i0 .. i1-1, each for one image after another
                (its weights still in cache for the next), into strided slices of out."""
                for k0, k1 in zip(cuts[i0:i1], cuts[i0 + 1 : i1 + 1]):
                    for n in images:
                        a = cols[(n - images[0]) * P : (n - images[0] + 1) * P]             # (P, R*S*C)
                        np.matmul(a, wmat[:, k0:k1], out=out2d[n * P : (n + 1) * P, k0:k1])  # (P, k1-k0)
                        finish_columns(n * P, (n + 1) * P, k0, k1)

            _side_by_side(columns, len(cuts) - 1, smallest=2)
        _late_heads(late, out)
        return out

    pieces = len(rows) - 1

    def tiles(i0, i1):
        """Unfold, GEMM and epilogue of pixel tiles i0 .. i1-1: tile i is tile i // N of image
        i % N, so that images follow one another on the same weights while they are in cache."""
        for i in range(i0, i1):
            j, n = divmod(i, N)
            p0, m = n * P + rows[j], rows[j + 1] - rows[j]
            cols = unfolded(p0, m)                                     # (m, R*S*C)
            dest = out2d[p0 : p0 + m]
            acc = dest if dest.flags.c_contiguous else _scratch("acc", (m, K))
            np.matmul(cols, wmat, out=acc)                             # (m, K)
            if finish:
                _finish_in_place(acc, bias, relu)
            for h0, h_bias, h_relu, h_rows, h_d0 in heads:             # (m, K_i) each, into its dst
                _finish_rows(acc, h0, h_bias, h_relu, h_rows[p0 : p0 + m], h_d0, 0, m)
            if acc is not dest:
                np.copyto(dest, acc)                                   # into the channel slice

    _side_by_side(tiles, N * pieces, smallest=2)
    _late_heads(late, out)
    return out


# --- one image's products, cut the same way in any batch --------------------------
# Why an image's bits never depend on its batch, threads or callers: every BLAS call holds one
# image's rows, cut where that image's geometry alone says, and BLAS runs single-threaded.
# A BLAS picks its summation order by the shape of each call: OpenBLAS's AVX2 kernel gives a
# row other bits in a 64-row product than in a 65- or 128-row one (only multiples of 12 rows
# agreed), and a column other bits in a narrower product. Its AVX-512 kernel happens not to,
# which is why the promise once held on some machines and not on others.


def _gemm_pieces(rows, K, D):
    """How conv2d cuts one image's (rows, D) @ (D, K) product, from its own geometry alone
    (never the batch or the threads): (row bounds, column bounds).

    By output channels (all rows, two halves of the columns) where the weights far
    outweigh the input, K > 4 rows: v3's 8x8 layers, which at batch 1 are bound by
    streaming their weights from memory; each thread of a lone image then reads half of
    them. Else by rows, in tiles of at most
    _SCRATCH_FLOATS unfolded values, and an even number of at least two where there are
    2 * _SIDE_BY_SIDE_MIN rows or more, so that a lone image's two threads share the tiles
    evenly; inside a batch each image runs the same tiles.
    """
    if K > 4 * rows and K >= _SIDE_BY_SIDE_MIN and rows * D <= _SCRATCH_FLOATS:
        return (0, rows), (0, K // 2, K)
    pieces = max(1, -(-rows * D // _SCRATCH_FLOATS))
    if rows >= 2 * _SIDE_BY_SIDE_MIN:
        pieces = max(2, pieces + pieces % 2)
    pieces = min(pieces, rows)
    return tuple(j * rows // pieces for j in range(pieces + 1)), (0, K)


def _head_windows(heads, pixels_shape, K):
    """conv2d's heads as (k0, bias, relu, dst's parent as (M, *) rows, dst's first channel),
    and apart the heads whose dst is no window of a C-contiguous array (`_late_heads`)."""
    windows, late = [], []
    for k0, h_bias, h_relu, dst in heads:
        h_bias = _as_f32(h_bias)
        if h_bias.ndim != 1 or not 0 <= k0 <= k0 + len(h_bias) <= K:
            raise ValueError(f"a head's columns {k0} .. {k0 + h_bias.size - 1} are not among the product's {K}")
        if dst is None:
            raise ValueError("each head needs its dst array")
        dst = _output(dst, (*pixels_shape, len(h_bias)))
        window = _output_window(dst)
        if window is None:
            late.append((k0, h_bias, h_relu, dst))
        else:
            windows.append((k0, h_bias, h_relu, _pixels(window[0]), window[1]))
    return windows, late


def _late_heads(late, y):
    """The heads _head_windows set apart, from the finished product y."""
    for k0, h_bias, h_relu, dst in late:
        bias_act(y[..., k0 : k0 + len(h_bias)], h_bias, h_relu, out=dst)


# Unfolded patches of one tile must fit here: 4M floats = 16 MB, below glibc's 32 MB
# mmap threshold, and reused across calls (one per thread), so no page is faulted in twice.
_SCRATCH_FLOATS = 4 << 20
