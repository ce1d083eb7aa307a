"""Convolution on the CPU: im2col (Numba) + pyincept's own matrix product (gemm.py), with
the bias and ReLU epilogue in the product's registers and the fused 1x1's heads applied
while each tile is in cache. The readable twin is `reference.conv2d`; the shape letters
are `cpu.py`'s.
"""

import numpy as np

from .geometry import conv_output_hw, pad4, pair
from .gemm import gemm, gemm_into, pack_weights, padded_bias
from .runtime import (
    _SIDE_BY_SIDE_MIN, _as_f32, _bias_vector, _check_nhwc, _jit, _output, _output_window, _scratch,
    _side_by_side,
)
from .dense import _finish_rows, _pixels, bias_act


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


def conv2d(x, w, bias=None, stride=1, padding=0, relu=False, out=None, heads=()):
    """Convolution as im2col + GEMM. x (N,H,W,C), w (R,S,C,K), bias (K,) -> (N,OH,OW,K).

    w: the filters, HWIO, or the same packed once at load (`pack_weights`: Panels).
    padding: an int, (pad_h, pad_w) or per side (top, bottom, left, right).
    relu: apply max(0, .) after the bias (the folded BasicConv2d epilogue).
    out: optional (N,OH,OW,K) float32 array to write into, e.g. a channel slice of a
         concat buffer.
    heads: epilogues of column ranges of the raw product (no bias or relu of its own),
         for the members of a fused 1x1 (fusion.Pointwise1x1): each (k0, bias_i, relu_i, dst)
         writes y[..., k0 : k0 + len(bias_i)] + bias_i, ReLU if relu_i, into dst.

    The whole batch's output pixels are the product's rows, (N*OH*OW, R*S*C) @ (R*S*C, K):
    every output is one FMA chain (kernels/gemm.py), so an image's bits do not depend on
    its neighbours and the weights are read once per batch. The rows are cut into tiles
    of at most _SCRATCH_FLOATS unfolded values, each unfolded (im2col) into a scratch
    matrix reused across tiles and calls, multiplied straight into `out` (a channel
    window of a module's output included) with the bias and ReLU applied in registers.
    A 1x1 stride-1 convolution skips the unfolding: its input already is the (N*H*W, C)
    matrix. A lone image's two threads take half the tiles each, or, where its few rows
    meet many weights (v3's 8x8 layers), half the weight panels each. The heads run on
    each tile while it is in cache.
    """
    x = _check_nhwc(x, "x")
    panels = pack_weights(w)
    if panels.ndim != 4 or panels.shape[2] != x.shape[3]:
        raise ValueError(f"weights must be (R, S, C={x.shape[3]}, K), got {panels.shape}")
    R, S, C, K = panels.shape
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, _ = x.shape
    OH, OW = conv_output_hw(H, W, (R, S), (sh, sw), (top, bottom, left, right))
    finish = bias is not None or relu                                  # else the GEMM is all (a fused 1x1's raw columns)
    if heads and finish:
        raise ValueError("heads take the raw product: give the conv no bias or relu of its own")
    bias = _bias_vector(bias, K)
    out = _output(out, (N, OH, OW, K))
    window = _output_window(out)
    if window is None:                                                 # out is no window of a buffer
        np.copyto(out, conv2d(x, panels, bias if finish else None, stride, padding, relu, None, heads))
        return out
    heads, late = _head_windows(heads, (N, OH, OW), K)
    parent, c0 = window
    whole = _pixels(parent)                                            # (N*OH*OW, row): out is whole[:, c0 : c0 + K]
    product = whole[:, c0 : c0 + K]                                    # (M, K), a row stride of `row`
    path, D, M = panels.path, R * S * C, N * OH * OW
    epilogue = padded_bias(bias, K, path) if finish else None
    pointwise = (R, S, sh, sw, top, bottom, left, right) == (1, 1, 1, 1, 0, 0, 0, 0)
    x2d = x.reshape(M, C) if pointwise else None
    P = panels.data.shape[0]

    def unfolded(i0, i1):
        """Rows i0 .. i1-1 of the (N*OH*OW, R*S*C) im2col matrix: a view for a 1x1, else unfolded."""
        if pointwise:
            return x2d[i0:i1]                                          # (m, C): no unfolding
        a = _scratch("cols", (i1 - i0, D))                             # (m, R*S*C)
        _unfold(x, R, S, sh, sw, top, left, OH, OW, i0, a)
        return a

    def multiply(a, i0, i1, j0, j1):
        """GEMM and epilogue of rows i0 .. i1-1 (a: their unfolded rows), panels j0 .. j1-1."""
        gemm_into(a, panels, product[i0:i1], 0, i1 - i0, j0, j1, epilogue, relu)
        k0, k1 = j0 * path.nr, min(K, j1 * path.nr)
        for h0, h_bias, h_relu, h_rows, h_d0 in heads:                 # the heads' columns among k0 .. k1-1
            a0, b0 = max(h0, k0), min(h0 + len(h_bias), k1)
            if a0 < b0:
                _finish_rows(whole, c0 + a0, h_bias[a0 - h0 : b0 - h0], h_relu, h_rows, h_d0 + a0 - h0, i0, i1)

    if K > 4 * M and P >= 2 and M * D <= _SCRATCH_FLOATS:             # few rows, many weights: split the panels,
        a = unfolded(0, M)                                             # every row unfolded once
        _side_by_side(lambda j0, j1: multiply(a, 0, M, j0, j1), P, smallest=2)
    else:
        rows = _row_tiles(M, D, path.rows, pointwise)                  # tile bounds
        _side_by_side(lambda t0, t1: [multiply(unfolded(rows[t], rows[t + 1]), rows[t], rows[t + 1], 0, P)
                                      for t in range(t0, t1)], len(rows) - 1, smallest=2)
    _late_heads(late, out)
    return out


def _row_tiles(M, D, MR, pointwise):
    """Bounds of a product's row tiles: at most _SCRATCH_FLOATS unfolded values each (a 1x1's
    rows are read in place: one tile), an even number of two or more where a lone image's
    two threads can share them, each a whole number of micro-kernel rows but the last."""
    pieces = 1 if pointwise else max(1, -(-M * D // _SCRATCH_FLOATS))
    if M >= 2 * _SIDE_BY_SIDE_MIN:
        pieces = max(2, pieces + pieces % 2)
    step = -(-(-(-M // pieces)) // MR) * MR                            # rows per tile, whole MR tiles
    return tuple(range(0, M, step)) + (M,)


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


# --- the backward pass: conv2d's vector-Jacobian product ----------------------------------


@_jit
def _fold(dcols, R, S, sh, sw, top, left, OH, OW, p0, dx):
    """col2im, `_unfold`'s adjoint, for output pixels p0 .. p0+m-1 (m = len(dcols)): each
    row's values go back to the input pixels their patch read, dx[n, ih, iw, c] +=
    dcols[i, (r*S + s)*C + c], and those that read the padding are dropped. An input pixel
    sums its patches' values in one fixed order (pixel, then tap), whatever the tiling."""
    N, H, W, C = dx.shape
    for i in range(dcols.shape[0]):
        n, q = divmod(p0 + i, OH * OW)
        oh, ow = divmod(q, OW)
        ih0, iw0 = oh * sh - top, ow * sw - left
        for r in range(R):
            ih = ih0 + r
            if 0 <= ih < H:
                for s in range(S):
                    iw = iw0 + s
                    if 0 <= iw < W:
                        base = (r * S + s) * C
                        for c in range(C):
                            dx[n, ih, iw, c] += dcols[i, base + c]


def conv2d_vjp(dy, x, w, stride=1, padding=0, params=True):
    """conv2d's vector-Jacobian product (its linear part; a ReLU's comes first, `relu_vjp`):
    dy (N, OH, OW, K) -> dx (N, H, W, C), and with `params` dw (R, S, C, K) and db (K,), else
    None. The twin is `reference.conv2d_vjp`, the math in its docstring.

        dx = col2im(dy @ Wt)    a GEMM by the rule, (N*OH*OW, K) @ (K, R*S*C), then `_fold`
        dw = im2col(x)t @ dy    a GEMM whose depth is the batch's output pixels
        db = the sum of dy over N, OH, OW (in float64)

    w: the HWIO filters, or their Panels (unpacked here). An image's dx comes from its own
    rows only, in one fixed order, so it has the same bits alone or in any batch; dw and db
    sum over the batch, a group of images (about _SCRATCH_FLOATS unfolded values) at a time.
    """
    x = _check_nhwc(x, "x")
    w = w.unpack() if hasattr(w, "unpack") else _as_f32(w)
    R, S, C, K = w.shape
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, _ = x.shape
    OH, OW = conv_output_hw(H, W, (R, S), (sh, sw), (top, bottom, left, right))
    dy = np.ascontiguousarray(_as_f32(dy))
    if dy.shape != (N, OH, OW, K):
        raise ValueError(f"conv2d_vjp: dy is {dy.shape}, the conv's output is {(N, OH, OW, K)}")
    D, pixels = R * S * C, OH * OW
    pointwise = (R, S, sh, sw, top, bottom, left, right) == (1, 1, 1, 1, 0, 0, 0, 0)
    wt = pack_weights(np.ascontiguousarray(w.reshape(D, K).T))       # (K, R*S*C): the transposed filters
    g = dy.reshape(N * pixels, K)                                     # (N*OH*OW, K)
    dx = np.zeros((N, H, W, C), np.float32)
    dw = np.zeros((D, K), np.float32) if params else None
    per_group = max(1, _SCRATCH_FLOATS // max(1, pixels * D))        # images per group
    for n0 in range(0, N, per_group):
        n1 = min(N, n0 + per_group)
        rows = slice(n0 * pixels, n1 * pixels)
        if pointwise:
            dx[n0:n1] = gemm(g[rows], wt).reshape(n1 - n0, H, W, C)   # a 1x1's input is its im2col matrix
        else:
            dcols = _scratch("dcols", ((n1 - n0) * pixels, D))
            _side_by_side(lambda j0, j1: gemm_into(g[rows], wt, dcols, 0, None, j0, j1), wt.data.shape[0], smallest=2)
            _fold(dcols, R, S, sh, sw, top, left, OH, OW, 0, dx[n0:n1])
        if params:
            if pointwise:
                cols = x[n0:n1].reshape(-1, C)
            else:
                cols = _scratch("cols", ((n1 - n0) * pixels, D))
                _unfold(x[n0:n1], R, S, sh, sw, top, left, OH, OW, 0, cols)
            dw += gemm(np.ascontiguousarray(cols.T), g[rows])          # (R*S*C, M) @ (M, K)
    if not params:
        return dx, None, None
    return dx, dw.reshape(R, S, C, K), g.sum(axis=0, dtype=np.float64).astype(np.float32)
