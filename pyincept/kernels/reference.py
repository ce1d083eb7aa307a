"""The readable math: every kernel pyincept uses, in plain NumPy.

This file is what a student reads first, and what the tests check the fast Numba
kernels in `cpu.py` against (torch then checks both). Nothing here is tuned: no
Numba, no buffers, no tiling. Every function has the same signature as its fast
twin in `pyincept.kernels.cpu`.

Shape legend (used in every kernel file)
-----------------------------------------
N  batch            H, W   input height and width     C  input channels
K  output channels  R, S   kernel height and width    OH, OW  output height, width
Layout is NHWC everywhere: x[n, h, w, c]. Convolution weights are HWIO: w[r, s, c, k].

Sections of the Inception v3 paper (Szegedy et al., 2015, arXiv:1512.00567) these
kernels serve: 2 (factorised convolutions: 1x7, 7x1, 1x3, 3x1), 5 (grid reduction
by parallel stride-2 conv and pool branches), 6 (the module table).
"""

import numpy as np

from .geometry import adaptive_windows, conv_output_size, pad4, pair, pool_output_size

DEVICE = "reference"
HAS_WINOGRAD = True


def fma(a, b, c):
    """a * b + c rounded once to float32, elementwise: what one fused multiply-add does.

    In float64 the product of two float32 values is exact (24 + 24 significant bits fit in
    53), and adding c rounds at most once more. That second rounding, followed by the one
    to float32, could land on the other side of a float32 halfway point (double rounding),
    so the float64 sum is rounded to odd first: when the sum was inexact (TwoSum's error
    term is not zero) and its last bit is even, it moves one step towards the exact value.
    A value rounded to odd with at least two bits to spare rounds to nearest exactly as the
    exact value would (Boldo and Melquiond, "When double rounding is odd", 2005).
    """
    with np.errstate(invalid="ignore", over="ignore"):                  # inf and NaN pass through as IEEE says
        p = np.asarray(a, np.float64) * np.asarray(b, np.float64)       # exact
        c = np.asarray(c, np.float64)
        s = p + c                                                        # rounded once, to float64
        t = s - p
        error = (p - (s - t)) + (c - t)                                  # TwoSum: s + error == p + c exactly
        even = (s.view(np.int64) & 1) == 0
        nudge = (error != 0) & even & np.isfinite(s)
        s = np.where(nudge, np.nextafter(s, np.where(error > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def gemm(a, b):
    """C = A @ B, (M, D) @ (D, K) -> (M, K), by pyincept's rule: every output is one FMA
    chain over the depth, in order. For each k, every output (i, j) takes one step,
    C[i, j] = fma(A[i, k], B[k, j], C[i, j]); the loops over i and j are NumPy's
    broadcasting. `kernels.gemm` computes the same bits, vectorised and blocked."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    M, D = a.shape
    c = np.zeros((M, b.shape[1]), np.float32)
    for k in range(D):                                                   # in order, never split
        c = fma(a[:, k, None], b[None, k, :], c)                         # (M, 1) x (1, K) + (M, K)
    return c


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold every R x S patch of x into one row: (N, H, W, C) -> (N, OH, OW, R*S*C).

    Why: a convolution is a dot product between each patch and each filter. Laid
    out as rows, all patches times all filters become ONE matrix product,
    (N*OH*OW, R*S*C) @ (R*S*C, K), which a GEMM computes near the machine's peak.
    Row order inside a patch is (r, s, c), matching HWIO weights reshaped to (R*S*C, K).
    """
    R, S = pair(kernel_size)
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, C = x.shape
    OH = conv_output_size(H, R, sh, top, bottom)
    OW = conv_output_size(W, S, sw, left, right)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))   # zero padding
    patches = np.empty((N, OH, OW, R, S, C), x.dtype)
    for r in range(R):
        for s in range(S):
            # Tap (r, s) of every output pixel reads a strided window of the padded input.
            patches[:, :, :, r, s, :] = xp[:, r : r + sh * OH : sh, s : s + sw * OW : sw, :]
    return patches.reshape(N, OH, OW, R * S * C)


def conv2d(x, w, bias=None, stride=1, padding=0, relu=False, out=None, heads=()):
    """Convolution as im2col + GEMM. x (N,H,W,C), w (R,S,C,K), bias (K,) -> (N,OH,OW,K).

    padding: an int, (pad_h, pad_w) or per side (top, bottom, left, right).
    relu: apply max(0, .) after the bias (the folded BasicConv2d epilogue).
    out: optional (N,OH,OW,K) array, e.g. a channel slice of a concat buffer, to write into.
    heads: for a fused 1x1's members, each (k0, bias_i, relu_i, dst) also writes the
           epilogue of the product's columns k0 .. k0+len(bias_i)-1 into dst.
    """
    R, S, C, K = w.shape
    cols = im2col(x, (R, S), stride, padding)                    # (N, OH, OW, R*S*C)
    y = cols @ w.reshape(R * S * C, K)                            # (N, OH, OW, K)
    for k0, head_bias, head_relu, dst in heads:
        bias_act(y[..., k0 : k0 + len(head_bias)], head_bias, head_relu, out=dst)
    if bias is not None:
        y = y + bias
    if relu:
        y = np.maximum(y, 0)
    return _deliver(y.astype(_float(x, w)), out)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """im2col's adjoint: (N, OH, OW, R*S*C) -> (N, H, W, C). Each row's R x S x C values go
    back to the patch they came from and are summed where patches overlap; values that
    came from the padding are dropped. sum(im2col(x) * g) == sum(x * col2im(g)) for all x, g."""
    R, S = pair(kernel_size)
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, C = x_shape
    OH, OW = cols.shape[1:3]
    patches = cols.reshape(N, OH, OW, R, S, C)
    xp = np.zeros((N, H + top + bottom, W + left + right, C), cols.dtype)
    for r in range(R):
        for s in range(S):
            xp[:, r : r + sh * OH : sh, s : s + sw * OW : sw, :] += patches[:, :, :, r, s, :]
    return xp[:, top : top + H, left : left + W]


def conv2d_vjp(dy, x, w, stride=1, padding=0, params=True):
    """The vector-Jacobian product of conv2d's linear part, y = im2col(x) @ W (+ b), given
    dy = dL/dy (N, OH, OW, K) -> (dx (N, H, W, C), dw (R, S, C, K), db (K,)); dw and db are
    None unless `params`. A ReLU after the conv is `relu_vjp`'s, first.

        dx = col2im(dy @ Wt)      every patch gets back its share of each output's gradient
        dw = im2col(x)t @ dy      each filter tap: its input values times the outputs' gradients
        db = sum of dy over N, OH, OW
    """
    R, S, C, K = w.shape
    dtype = np.result_type(dy, x, w)
    g = dy.reshape(-1, K).astype(dtype)                              # (N*OH*OW, K)
    dcols = g @ w.reshape(R * S * C, K).T.astype(dtype)              # (N*OH*OW, R*S*C)
    dx = col2im(dcols.reshape(*dy.shape[:3], R * S * C), x.shape, (R, S), stride, padding)
    if not params:
        return dx, None, None
    cols = im2col(x.astype(dtype), (R, S), stride, padding).reshape(-1, R * S * C)
    dw = (cols.T @ g).reshape(R, S, C, K)                            # (R*S*C, K)
    return dx, dw, g.sum(axis=0)


# --- Winograd F(2x2, 3x3) and F(4x4, 3x3) ------------------------------------------------
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). An m x m block
# of outputs of a 3x3 convolution (stride 1) is Y = AT [ (G g GT) * (BT d B) ] A, where d is
# the (m+2) x (m+2) input patch under the block, g the 3x3 filter and * the elementwise
# product: (m+2)^2 multiplications instead of 9 m^2. Summed over input channels, the
# products become (m+2)^2 independent matrix products, (tiles, C) @ (C, K). F(2x2, 3x3):
# 16 products for 4 outputs, 2.25x fewer multiply-adds than im2col's GEMM; F(4x4, 3x3):
# 36 for 16, 4x fewer, with larger coefficients (float32 error ~1e-5 instead of ~1e-6).
WINOGRAD = {
    2: {  # F(2x2, 3x3): points 0, 1, -1 and infinity
        "BT": np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        "G": np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        "AT": np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    },
    4: {  # F(4x4, 3x3): points 0, 1, -1, 2, -2 and infinity
        "BT": np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        "G": np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        "AT": np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    },
}


# F(2, 7) for the 1x7 and 7x1 convs, along one axis: y = AT [(G g) * (BT d)] over the 8
# inputs under 2 outputs, 8 products instead of 14 (1.75x fewer); points 0, +-1, +-2,
# +-1/2 and infinity. BT is the unique matrix that makes the whole a correlation.
WINOGRAD_7 = {
    "BT": np.array([[1, 0, -5.25, 0, 5.25, 0, -1, 0], [0, -1, -1, 4.25, 4.25, -1, -1, 0],
                    [0, 1, -1, -4.25, 4.25, 1, -1, 0], [0, 0.5, 0.25, -2.5, -1.25, 2, 1, 0],
                    [0, -0.5, 0.25, 2.5, -1.25, -2, 1, 0], [0, 2, 4, -2.5, -5, 0.5, 1, 0],
                    [0, -2, 4, 2.5, -5, -0.5, 1, 0], [0, 1, 0, -5.25, 0, 5.25, 0, -1]], np.float64),
    "G": np.array([[1, 0, 0, 0, 0, 0, 0], [2 / 9] * 7, [2 / 9, -2 / 9, 2 / 9, -2 / 9, 2 / 9, -2 / 9, 2 / 9],
                   [1 / 90, 1 / 45, 2 / 45, 4 / 45, 8 / 45, 16 / 45, 32 / 45],
                   [1 / 90, -1 / 45, 2 / 45, -4 / 45, 8 / 45, -16 / 45, 32 / 45],
                   [32 / 45, 16 / 45, 8 / 45, 4 / 45, 2 / 45, 1 / 45, 1 / 90],
                   [32 / 45, -16 / 45, 8 / 45, -4 / 45, 2 / 45, -1 / 45, 1 / 90], [0, 0, 0, 0, 0, 0, 1]], np.float64),
    "AT": np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0.5, -0.5, -1]], np.float64),
}
# F(2x2, 5x5) for the 5x5 convs of Mixed_5b-d: the same 6x6 patches and points as F(4x4,
# 3x3), so the same BT; 36 products for 4 outputs instead of 100 (2.8x fewer). G's rows
# are F(4x4, 3x3)'s scale factors times the points' powers 0..4.
WINOGRAD_5 = {
    "BT": WINOGRAD[4]["BT"],
    "G": np.array([[1 / 4, 0, 0, 0, 0], [-1 / 6] * 5, [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3], [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3],
                   [0, 0, 0, 0, 1]], np.float64),
    "AT": np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1]], np.float64),
}
# F(4, 7): 10 products for 4 outputs instead of 28 (2.8x fewer; on v3's 17-wide maps, 5
# tiles of 4 per line instead of 9 of 2: 0.69x F(2, 7)'s products). The points of F(2, 7)
# plus +-3/4 and infinity, which of the pairs tried (+-3, +-1/3, +-4, +-1/4, +-3/2,
# +-2/3, +-3/4, +-4/3) had the least float32 error: 1.5e-6 of the output's scale, against
# F(2, 7)'s 0.9e-6. BT's rows are scaled to integers (exact in float32); G takes the
# scale. Rows 2p-1 and 2p (the points +q, -q) share their coefficients up to the sign of
# the odd inputs, which the fast transform uses: row(+q) = E + O, row(-q) = E - O.
WINOGRAD_7_4 = {
    "BT": np.array([[36, 0, -253, 0, 525, 0, -372, 0, 64, 0],
                    [0, -36, -36, 217, 217, -308, -308, 64, 64, 0], [0, 36, -36, -217, 217, 308, -308, -64, 64, 0],
                    [0, -18, -9, 122, 61, -232, -116, 128, 64, 0], [0, 18, -9, -122, 61, 232, -116, -128, 64, 0],
                    [0, -36, -72, 109, 218, -89, -178, 16, 32, 0], [0, 36, -72, -109, 218, 89, -178, -16, 32, 0],
                    [0, -12, -16, 63, 84, -63, -84, 12, 16, 0], [0, 12, -16, -63, 84, 63, -84, -12, 16, 0],
                    [0, 36, 0, -253, 0, 525, 0, -372, 0, 64]], np.float64),
    "G": np.array([[1 / 36, 0, 0, 0, 0, 0, 0],
                   [-1 / 126] * 7, [-1 / 126, 1 / 126, -1 / 126, 1 / 126, -1 / 126, 1 / 126, -1 / 126],
                   [1 / 19800, 1 / 9900, 1 / 4950, 1 / 2475, 2 / 2475, 4 / 2475, 8 / 2475],
                   [1 / 19800, -1 / 9900, 1 / 4950, -1 / 2475, 2 / 2475, -4 / 2475, 8 / 2475],
                   [-16 / 225, -8 / 225, -4 / 225, -2 / 225, -1 / 225, -1 / 450, -1 / 900],
                   [-16 / 225, 8 / 225, -4 / 225, 2 / 225, -1 / 225, 1 / 450, -1 / 900],
                   [2048 / 17325, 512 / 5775, 128 / 1925, 96 / 1925, 72 / 1925, 54 / 1925, 81 / 3850],
                   [2048 / 17325, -512 / 5775, 128 / 1925, -96 / 1925, 72 / 1925, -54 / 1925, 81 / 3850],
                   [0, 0, 0, 0, 0, 0, 1 / 64]], np.float64),
    "AT": np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 3 / 4, -3 / 4, 0],
                    [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 9 / 16, 9 / 16, 0],
                    [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 27 / 64, -27 / 64, 1]], np.float64),
}
WINOGRAD_KERNELS = ((3, 3), (5, 5), (1, 3), (3, 1), (1, 7), (7, 1))
# The one-axis filters run along their axis: 1x3 and 3x1 (Mixed_7b-c) by F(4, 3), the
# matrices of F(4x4, 3x3) used on one side only (6 products for 4 outputs, 2x fewer);
# 1x7 and 7x1 by F(2, 7) or F(4, 7). By filter length, then outputs per tile.
WINOGRAD_1D = {3: {4: WINOGRAD[4]}, 7: {2: WINOGRAD_7, 4: WINOGRAD_7_4}}


def _line_table(r, m):
    """The F(m, r) matrices of a 1xr or rx1 filter: F(4, 3), F(2, 7) or F(4, 7)."""
    if m not in WINOGRAD_1D[r]:
        raise ValueError(f"1x{r} Winograd tiles are {' or '.join(map(str, WINOGRAD_1D[r]))} outputs long, got {m}")
    return WINOGRAD_1D[r][m]


def _square_table(r, m):
    """The F(m x m, r x r) matrices: 3x3 by tile m = 2 or 4, 5x5 by m = 2."""
    if r == 5:
        if m != 2:
            raise ValueError(f"5x5 Winograd tiles are 2 outputs wide, got {m}")
        return WINOGRAD_5
    if m not in WINOGRAD:
        raise ValueError(f"Winograd tiles are 2 or 4 outputs wide, got {m}")
    return WINOGRAD[m]


def winograd_weights(w, tile=2):
    """Filters in the Winograd domain, computed in float64, stored float32:
    3x3 (3, 3, C, K) -> U = G g GT of F(tile x tile, 3x3), (tile + 2, tile + 2, C, K);
    5x5 (5, 5, C, K) -> U of F(2x2, 5x5), (6, 6, C, K);
    1x3 or 3x1 -> U = G g of F(4, 3), (6, C, K) (tile 4);
    1x7 or 7x1 -> U = G g of F(tile, 7): (8, C, K) for tile 2, (10, C, K) for tile 4."""
    if tuple(w.shape[:2]) not in WINOGRAD_KERNELS:
        raise ValueError(f"Winograd here needs 3x3, 5x5, 1x3, 3x1, 1x7 or 7x1 filters, got {w.shape[:2]}")
    C, K = w.shape[2:]
    if 1 in w.shape[:2]:                                                      # a one-axis filter
        r = max(w.shape[:2])
        G = _line_table(r, tile)["G"]                                         # (n, r)
        taps = w.reshape(r, C * K).astype(np.float64)                         # (r, C*K)
        return _in_order(G, taps).astype(np.float32).reshape(len(G), C, K)   # G g: (n, C, K)
    G = _square_table(w.shape[0], tile)["G"]                                  # (n, r)
    n, r = G.shape
    # Both products run along long rows of C*K values (as two tensordots, which transposed
    # the filters, they took 3-5x longer: a quarter of loading the network).
    gw = _in_order(G, w.reshape(r, r * C * K).astype(np.float64)).reshape(n, r, C * K)   # G g: rows of g
    u = np.empty((n, n, C * K), np.float32)
    for a in range(n):
        u[a] = _in_order(G, gw[a])                                            # (G g) GT: its columns
    return u.reshape(n, n, C, K)


def _in_order(G, x):
    """G @ x for a small G (n, r), each sum over r taken in order in float64: the same bits
    on every machine (a BLAS would pick its own order by kernel, so the transformed filters,
    and every logit after them, could differ in the last bit from one CPU to another)."""
    out = np.zeros((G.shape[0], *x.shape[1:]), np.float64)
    term = np.empty(x.shape[1:], np.float64)
    for a in range(G.shape[0]):
        for t in range(G.shape[1]):
            if G[a, t] != 0:                                                  # G is sparse: skip its zeros
                np.add(out[a], np.multiply(x[t], G[a, t], out=term), out=out[a])   # out[a] += G[a, t] x[t]
    return out


def conv2d_winograd(x, u, bias=None, padding=0, relu=False, out=None, kernel_size=(3, 3)):
    """A stride-1 convolution by Winograd; u = winograd_weights(w, m) for w of kernel_size:
    3x3 by F(m x m, 3x3), 5x5 by F(2x2, 5x5), 1x3 and 3x1 by F(4, 3), 1x7 and 7x1 by
    F(2, 7) or F(4, 7), the last four along their axis (padding only there).

    Same result as conv2d(x, w, bias, 1, padding, relu) up to float rounding.
    """
    R, S = kernel_size
    if 1 in (R, S):
        return _conv2d_winograd_1d(x, u, bias, padding, relu, out, max(R, S), along_w=R == 1)
    top, bottom, left, right = pad4(padding)
    N, H, W, C = x.shape
    r = kernel_size[0]                                             # 3 or 5
    n, K = u.shape[0], u.shape[3]                                  # n = m + r - 1: the patch
    m = n - r + 1                                                  # outputs per tile side
    BT, AT = _square_table(r, m)["BT"], _square_table(r, m)["AT"]
    OH = conv_output_size(H, r, 1, top, bottom)
    OW = conv_output_size(W, r, 1, left, right)
    TH, TW = -(-OH // m), -(-OW // m)                              # tiles of m x m outputs
    # Every tile reads the n x n input patch starting at (m*th, m*tw) of the padded input;
    # rows and columns past the padding are zeros that only reach outputs past OH, OW.
    xp = np.zeros((N, m * TH + r - 1, m * TW + r - 1, C), np.float32)
    xp[:, top : top + H, left : left + W] = x
    d = np.empty((N, TH, TW, n, n, C), np.float32)                  # (N, TH, TW, n, n, C) patches
    for i in range(n):
        for j in range(n):
            d[:, :, :, i, j] = xp[:, i : i + m * TH : m, j : j + m * TW : m]
    v = np.einsum("ai,nhwijc,bj->nhwabc", BT, d, BT)                         # BT d B
    p = np.einsum("nhwabc,abck->nhwabk", v, u)                              # n*n GEMMs over C
    y = np.einsum("pa,nhwabk,qb->nhpwqk", AT, p, AT)                        # AT p A: (N, TH, m, TW, m, K)
    y = y.reshape(N, m * TH, m * TW, K)[:, :OH, :OW]
    if bias is not None:
        y = y + bias
    if relu:
        y = np.maximum(y, 0)
    return _deliver(y.astype(np.float32), out)


def _conv2d_winograd_1d(x, u, bias, padding, relu, out, r, along_w):
    """F(m, r) along W (1xr) or H (rx1); the other axis is a plain batch of lines."""
    n = u.shape[0]                                                # inputs under a tile
    m = n - r + 1                                                 # outputs per tile
    table = _line_table(r, m)
    top, bottom, left, right = pad4(padding)
    if not along_w:                                               # the rx1 case is the 1xr case, transposed
        x = x.transpose(0, 2, 1, 3)
        top, bottom, left, right = left, right, top, bottom
    if top or bottom:
        raise ValueError(f"a 1x{r} or {r}x1 Winograd filter pads only along its own axis")
    N, L, W, C = x.shape                                          # L lines of W pixels
    OW = conv_output_size(W, r, 1, left, right)
    T = -(-OW // m)                                               # tiles of m outputs per line
    xp = np.zeros((N, L, m * T + r - 1, C), np.float32)
    xp[:, :, left : left + W] = x
    d = np.stack([xp[:, :, j : j + m * T : m] for j in range(n)], axis=3)          # (N, L, T, n, C)
    v = np.einsum("aj,nltjc->nltac", table["BT"], d)                              # BT d
    p = np.einsum("nltac,ack->nltak", v, u)                                       # n GEMMs over C
    y = np.einsum("pa,nltak->nltpk", table["AT"], p)                              # AT p: (N, L, T, m, K)
    y = y.reshape(N, L, m * T, -1)[:, :, :OW]
    if not along_w:
        y = y.transpose(0, 2, 1, 3)
    if bias is not None:
        y = y + bias
    if relu:
        y = np.maximum(y, 0)
    return _deliver(np.ascontiguousarray(y, dtype=np.float32), out)


def bias_act(x, bias, relu=True, out=None):
    """The conv epilogue on its own: max(0, x + bias) per channel (relu=False: only the bias)."""
    y = x + bias
    return _deliver((np.maximum(y, 0) if relu else y).astype(_float(x, bias)), out)


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, out=None):
    """Max over each window. Padding never wins: it counts as -infinity."""
    return _pool(x, kernel_size, stride, padding, ceil_mode, "max", True, out)


def max_pool2d_vjp(dy, x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """dL/dx of max_pool2d: each window's gradient goes to its maximum; where the maximum is
    tied, to the first in scan order (row by row), and where the window holds a NaN, to its
    last NaN, as torch does. Windows overlap when the stride is below the kernel: a pixel
    that wins several collects all their gradients."""
    R, S = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    ph, pw = pair(padding)
    N, H, W, C = x.shape
    dx = np.zeros(x.shape, np.result_type(dy, x))
    n, c = np.arange(N)[:, None], np.arange(C)[None, :]
    for oh, ow, (h0, h1, w0, w1) in _pool_windows(H, W, dy.shape[1], dy.shape[2], R, S, sh, sw, ph, pw):
        window = x[:, h0:h1, w0:w1, :].reshape(N, -1, C)                 # (N, window pixels, C), row by row
        winner = np.argmax(window, axis=1)                               # the first maximum
        nan = np.isnan(window)
        if nan.any():                                                    # torch: each NaN takes over
            winner = np.where(nan.any(axis=1), nan.shape[1] - 1 - np.argmax(nan[:, ::-1], axis=1), winner)
        dh, dw = np.divmod(winner, w1 - w0)
        np.add.at(dx, (n, h0 + dh, w0 + dw, c), dy[:, oh, ow, :])
    return dx


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, out=None):
    """Mean over each window.

    count_include_pad=True (torchvision's v3): zero padding counts in the divisor,
    so border means are pulled towards 0. False: divide by the real pixels only.
    Windows that ceil_mode lets hang past the padded edge never count the overhang.
    """
    return _pool(x, kernel_size, stride, padding, ceil_mode, "avg", count_include_pad, out)


def _pool(x, kernel_size, stride, padding, ceil_mode, mode, count_include_pad, out):
    R, S = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    ph, pw = pair(padding)
    N, H, W, C = x.shape
    OH = pool_output_size(H, R, sh, ph, ceil_mode)
    OW = pool_output_size(W, S, sw, pw, ceil_mode)
    y = np.empty((N, OH, OW, C), _float(x))
    for oh, ow, (h0, h1, w0, w1), padded_area in _pool_windows(H, W, OH, OW, R, S, sh, sw, ph, pw, area=True):
        window = x[:, h0:h1, w0:w1, :]                           # (N, <=R, <=S, C)
        if mode == "max":
            y[:, oh, ow, :] = window.max(axis=(1, 2))
        else:
            divisor = padded_area if count_include_pad else (h1 - h0) * (w1 - w0)
            y[:, oh, ow, :] = window.sum(axis=(1, 2), dtype=np.float64) / divisor
    return _deliver(y, out)


def avg_pool2d_vjp(dy, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """dL/dx of avg_pool2d: each window's gradient, divided by its divisor, spread evenly
    over the real pixels it covers (padding takes its share and drops it)."""
    R, S = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    ph, pw = pair(padding)
    N, H, W, C = x.shape
    dx = np.zeros(x.shape, np.result_type(dy, x))
    for oh, ow, (h0, h1, w0, w1), padded_area in _pool_windows(H, W, dy.shape[1], dy.shape[2], R, S, sh, sw, ph, pw,
                                                               area=True):
        divisor = padded_area if count_include_pad else (h1 - h0) * (w1 - w0)
        dx[:, h0:h1, w0:w1, :] += dy[:, oh, ow, None, None, :] / divisor
    return dx


def _pool_windows(H, W, OH, OW, R, S, sh, sw, ph, pw, area=False):
    """(oh, ow, (h0, h1, w0, w1)[, padded area]) for every output of a pool: its window in
    input coordinates, clipped to the input; the padded area counts the padding inside the
    padded frame (which ends at H + ph), never a ceil_mode overhang past it."""
    for oh in range(OH):
        for ow in range(OW):
            h0, w0 = oh * sh - ph, ow * sw - pw
            h1, w1 = min(h0 + R, H + ph), min(w0 + S, W + pw)
            padded_area = (h1 - h0) * (w1 - w0)
            window = (max(h0, 0), min(h1, H), max(w0, 0), min(w1, W))
            yield (oh, ow, window, padded_area) if area else (oh, ow, window)


def global_avg_pool2d(x):
    """Mean over all of H and W: (N, H, W, C) -> (N, 1, 1, C)."""
    return x.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(_float(x))


def global_avg_pool2d_vjp(dy, x):
    """dL/dx of the global mean: every pixel gets dy / (H*W)."""
    N, H, W, C = x.shape
    return np.broadcast_to(dy.reshape(N, 1, 1, C) / (H * W), x.shape).astype(np.result_type(dy, x))


def adaptive_avg_pool2d(x, output_size):
    """Mean over each of an output_size grid of windows (`adaptive_windows`): (N, H, W, C) ->
    (N, OH, OW, C). GoogLeNet's aux heads pool a 14x14 map to 4x4 this way."""
    OH, OW = pair(output_size)
    N, H, W, C = x.shape
    y = np.empty((N, OH, OW, C), _float(x))
    for i, (h0, h1) in enumerate(adaptive_windows(H, OH)):
        for j, (w0, w1) in enumerate(adaptive_windows(W, OW)):
            y[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2), dtype=np.float64)
    return y


def adaptive_avg_pool2d_vjp(dy, x, output_size):
    """dL/dx of adaptive_avg_pool2d: each window's gradient spread evenly over its pixels
    (windows that overlap by a pixel both send theirs there)."""
    OH, OW = pair(output_size)
    N, H, W, C = x.shape
    dx = np.zeros(x.shape, np.result_type(dy, x))
    for i, (h0, h1) in enumerate(adaptive_windows(H, OH)):
        for j, (w0, w1) in enumerate(adaptive_windows(W, OW)):
            dx[:, h0:h1, w0:w1, :] += dy[:, i, j, None, None, :] / ((h1 - h0) * (w1 - w0))
    return dx


def concat_channels(arrays, out=None):
    """Stack branch outputs along channels: [(N,H,W,K_i)] -> (N,H,W,sum K_i)."""
    return _deliver(np.concatenate(arrays, axis=3), out)


def concat_channels_vjp(dy, widths):
    """Concatenation's adjoint: dy's channel slices, one per input ([K_i])."""
    bounds = np.cumsum([0, *widths])
    return [dy[..., k0:k1] for k0, k1 in zip(bounds[:-1], bounds[1:])]


def linear(x, w, bias=None):
    """Fully connected layer. x (N, I), w (I, O) -> (N, O)."""
    y = x @ w
    return (y if bias is None else y + bias).astype(_float(x, w))


def linear_vjp(dy, x, w, params=True):
    """dL/dx = dy @ Wt (N, I); with params, dL/dW = xt @ dy (I, O) and dL/db = sum of dy over N."""
    dtype = np.result_type(dy, x, w)
    dx = dy.astype(dtype) @ w.T.astype(dtype)
    if not params:
        return dx, None, None
    return dx, x.T.astype(dtype) @ dy.astype(dtype), dy.sum(axis=0, dtype=dtype)


def relu(x):
    return np.maximum(x, 0).astype(_float(x))


def relu_vjp(dy, y):
    """dL/dx of y = max(0, x), from the output: dy where y > 0, else 0 (also at exactly 0,
    as torch's threshold_backward does)."""
    return np.where(y > 0, dy, 0).astype(np.result_type(dy, y))


def softmax(x):
    """Row-wise softmax over the last axis, shifted by the max so exp never overflows."""
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(_float(x))


def softmax_vjp(dy, y):
    """dL/dx of y = softmax(x), from the output: y * (dy - sum(dy * y)) per row."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def log_softmax(x):
    """log(softmax(x)) per row, as x - max - log(sum(exp(x - max))): no overflow, no log(0)."""
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def log_softmax_vjp(dy, y):
    """dL/dx of y = log_softmax(x), from the output: dy - softmax(x) * sum(dy) per row."""
    return dy - np.exp(y) * dy.sum(axis=-1, keepdims=True)


def batch_norm(x, gamma, beta, mean, var, eps=0.001):
    """Inference-time batch norm over channels (the last axis), unfolded: the math BN folding replaces."""
    return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(_float(x))


def _float(*arrays):
    """The float type a kernel computes and returns in: float32, or float64 when an operand
    is float64 (the twins then run the whole network in float64, for gradient checks)."""
    return np.result_type(*arrays, np.float32)


def _deliver(y, out):
    if out is None:
        return y
    out[...] = y
    return out


# --- the backend contract: arrays are plain NumPy, a batch runs whole --------------------


def winograd_tile(in_channels, kernel_size=(3, 3)):
    """The smallest tile of each filter, the easiest to follow: F(2x2, 3x3), F(2x2, 5x5),
    F(4, 3) for 1x3 and 3x1 (the only one), F(2, 7) for 1x7 and 7x1."""
    return 4 if tuple(kernel_size) in ((1, 3), (3, 1)) else 2


def empty(shape):
    return np.empty(shape, np.float32)


def to_device(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def to_host(a):
    return np.asarray(a)


def pack_weights(w):
    """The weights as conv2d and linear read them here: a plain float32 array (a list of
    arrays: their concatenation along the last axis, a fused 1x1's members)."""
    return to_device(np.concatenate(w, axis=-1) if isinstance(w, (list, tuple)) else w)


def map_batch(fn, N):
    """[fn(slice(0, N))]: the whole batch in one pass, on the calling thread."""
    return [fn(slice(0, N))]
