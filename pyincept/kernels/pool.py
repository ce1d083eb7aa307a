"""Pooling on the CPU: max and average pooling with PyTorch's window rules, global and
adaptive average pooling, as serial Numba kernels split across a lone image's threads.
The readable twins are in `reference.py`; the shape letters are `cpu.py`'s.
"""

import numpy as np

from .geometry import adaptive_windows, pair, pool_output_size
from .runtime import _channel_window, _check_nhwc, _jit, _output, _output_window, _side_by_side


# --- pooling ----------------------------------------------------------------------


@_jit
def _pool(x, c0, C, R, S, sh, sw, ph, pw, is_max, count_include_pad, out, d0, j0, j1):
    """Max or average pooling of channels c0 .. c0+C-1 of x (N,H,W,*) into channels
    d0 .. d0+C-1 of out (N,OH,OW,*), output rows j0 .. j1-1 across the batch; PyTorch's
    window rules.

    Separably, one output row at a time: the window's input rows are first reduced
    down H into `cols` (one C-vector per input column), then each output pixel reduces
    its window's columns of `cols`. A window of R x S pixels costs R + S vector steps
    instead of R * S. Max is
    exact either way; an average adds in a different order, within float rounding.
    The innermost loops run over channels, contiguous in NHWC; x and out are whole
    C-contiguous arrays (a module's branch is passed as its parent and first channel),
    so LLVM vectorises them.
    """
    N, H, W, _ = x.shape
    _, OH, OW, _ = out.shape
    cols = np.empty((W, C), np.float32)                 # the window's rows reduced down H, per input column
    acc = np.empty(C, np.float32)
    for job in range(j0, j1):
        n, oh = job // OH, job % OH
        h0 = oh * sh - ph
        h1 = min(h0 + R, H + ph)
        a0, a1 = max(h0, 0), min(h1, H)
        for w in range(W):                              # down H: rows a0 .. a1-1 into cols[w]
            src = x[n, a0, w, c0 : c0 + C]              # indexed from 0: no negative-index checks
            for c in range(C):
                cols[w, c] = src[c]
            for ih in range(a0 + 1, a1):
                src = x[n, ih, w, c0 : c0 + C]
                if is_max:
                    for c in range(C):
                        v = src[c]
                        if v > cols[w, c] or v != v:    # a NaN wins and stays, as in torch
                            cols[w, c] = v
                else:
                    for c in range(C):
                        cols[w, c] += src[c]
        for ow in range(OW):                            # along W: columns b0 .. b1-1 of cols
            w0 = ow * sw - pw
            w1 = min(w0 + S, W + pw)
            b0, b1 = max(w0, 0), min(w1, W)
            for c in range(C):
                acc[c] = cols[b0, c]
            for iw in range(b0 + 1, b1):
                if is_max:
                    for c in range(C):
                        v = cols[iw, c]
                        if v > acc[c] or v != v:
                            acc[c] = v
                else:
                    for c in range(C):
                        acc[c] += cols[iw, c]
            dst = out[n, oh, ow, d0 : d0 + C]
            if is_max:
                for c in range(C):
                    dst[c] = acc[c]
            else:
                divisor = np.float32((h1 - h0) * (w1 - w0) if count_include_pad else (a1 - a0) * (b1 - b0))
                for c in range(C):
                    dst[c] = acc[c] / divisor


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, out=None):
    """Max over each window. Padding never wins: it counts as -infinity."""
    return _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, True, True, out)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, out=None):
    """Mean over each window; count_include_pad decides whether zero padding counts in the divisor."""
    return _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, False, count_include_pad, out)


def _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, is_max, count_include_pad, out):
    x = _check_nhwc(x, "x", contiguous=False)                          # a channel slice is fine
    R, S = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    ph, pw = pair(padding)
    if ph > R // 2 or pw > S // 2 or min(ph, pw) < 0:
        raise ValueError(f"pool padding {(ph, pw)} must be between 0 and half the kernel {(R, S)}")
    N, H, W, C = x.shape
    OH = pool_output_size(H, R, sh, ph, ceil_mode)
    OW = pool_output_size(W, S, sw, pw, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError(f"input {H}x{W} is smaller than pool window {R}x{S}")
    out = _output(out, (N, OH, OW, C))
    src, c0 = _channel_window(x)
    window = _output_window(out)
    if window is None:
        np.copyto(out, _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, is_max, count_include_pad, None))
        return out
    dst, d0 = window
    _side_by_side(lambda j0, j1: _pool(src, c0, C, R, S, sh, sw, ph, pw, is_max, count_include_pad, dst, d0, j0, j1),
                  N * OH, ops=N * OH * W * C * R + out.size * S)            # values read: down H, then along W
    return out


@_jit
def _global_avg_pool(x, out):
    """Pixel by pixel, each adding its channel vector into float64 sums (contiguous, so
    vectorised; channel by channel, the reads strode across the image)."""
    N, H, W, C = x.shape
    total = np.empty(C, np.float64)
    for n in range(N):
        total[:] = 0.0
        for h in range(H):
            for w in range(W):
                src = x[n, h, w]
                for c in range(C):
                    total[c] += src[c]
        for c in range(C):
            out[n, 0, 0, c] = total[c] / (H * W)


def global_avg_pool2d(x):
    """Mean over all of H and W: (N, H, W, C) -> (N, 1, 1, C). Accumulates in float64."""
    x = _check_nhwc(x, "x")
    out = np.empty((x.shape[0], 1, 1, x.shape[3]), np.float32)
    _global_avg_pool(x, out)
    return out


@_jit
def _adaptive_avg_pool(x, rows, cols, out):
    """Each output pixel's window summed pixel by pixel into float64 channel sums, as
    _global_avg_pool does; rows[i] and cols[j] are window i's and j's (start, end)."""
    N, H, W, C = x.shape
    total = np.empty(C, np.float64)
    for n in range(N):
        for i in range(rows.shape[0]):
            for j in range(cols.shape[0]):
                total[:] = 0.0
                for h in range(rows[i, 0], rows[i, 1]):
                    for w in range(cols[j, 0], cols[j, 1]):
                        src = x[n, h, w]
                        for c in range(C):
                            total[c] += src[c]
                count = (rows[i, 1] - rows[i, 0]) * (cols[j, 1] - cols[j, 0])
                for c in range(C):
                    out[n, i, j, c] = total[c] / count


def adaptive_avg_pool2d(x, output_size):
    """Mean over each of an output_size grid of PyTorch's adaptive windows:
    (N, H, W, C) -> (N, OH, OW, C). Accumulates in float64."""
    x = _check_nhwc(x, "x")
    OH, OW = pair(output_size)
    rows = np.array(adaptive_windows(x.shape[1], OH), np.int64).reshape(OH, 2)
    cols = np.array(adaptive_windows(x.shape[2], OW), np.int64).reshape(OW, 2)
    out = np.empty((x.shape[0], OH, OW, x.shape[3]), np.float32)
    _adaptive_avg_pool(x, rows, cols, out)
    return out


# --- the backward pass: the pools' vector-Jacobian products ----------------------------------


@_jit
def _max_pool_vjp(x, dy, R, S, sh, sw, ph, pw, dx):
    """dx[winner of each window] += dy, windows in (oh, ow) order. The winner is torch's:
    the first maximum in scan order (row by row), or the last NaN where the window has one."""
    N, H, W, C = x.shape
    _, OH, OW, _ = dy.shape
    for n in range(N):
        for oh in range(OH):
            h0 = oh * sh - ph
            a0, a1 = max(h0, 0), min(h0 + R, H + ph, H)
            for ow in range(OW):
                w0 = ow * sw - pw
                b0, b1 = max(w0, 0), min(w0 + S, W + pw, W)
                for c in range(C):
                    bh, bw = a0, b0
                    best = x[n, a0, b0, c]
                    for ih in range(a0, a1):
                        for iw in range(b0, b1):
                            v = x[n, ih, iw, c]
                            if v > best or v != v:
                                best, bh, bw = v, ih, iw
                    dx[n, bh, bw, c] += dy[n, oh, ow, c]


@_jit
def _avg_pool_vjp(dy, R, S, sh, sw, ph, pw, count_include_pad, dx):
    """dx[window] += dy / divisor, windows in (oh, ow) order, in float32 (as the twin)."""
    N, H, W, C = dx.shape
    _, OH, OW, _ = dy.shape
    for n in range(N):
        for oh in range(OH):
            h0 = oh * sh - ph
            h1 = min(h0 + R, H + ph)
            a0, a1 = max(h0, 0), min(h1, H)
            for ow in range(OW):
                w0 = ow * sw - pw
                w1 = min(w0 + S, W + pw)
                b0, b1 = max(w0, 0), min(w1, W)
                divisor = np.float32((h1 - h0) * (w1 - w0) if count_include_pad else (a1 - a0) * (b1 - b0))
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        for c in range(C):
                            dx[n, ih, iw, c] += dy[n, oh, ow, c] / divisor


def _pool_vjp_arguments(dy, x, kernel_size, stride, padding, ceil_mode):
    x = np.ascontiguousarray(_check_nhwc(x, "x", contiguous=False))
    R, S = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    ph, pw = pair(padding)
    N, H, W, C = x.shape
    shape = (N, pool_output_size(H, R, sh, ph, ceil_mode), pool_output_size(W, S, sw, pw, ceil_mode), C)
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    if dy.shape != shape:
        raise ValueError(f"pool vjp: dy is {dy.shape}, the pool's output is {shape}")
    return x, dy, (R, S, sh, sw, ph, pw)


def max_pool2d_vjp(dy, x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """max_pool2d's vjp: dy (N, OH, OW, C) -> dx (N, H, W, C); each window's gradient to its
    winner (`_max_pool_vjp`). The same bits as the twin, `reference.max_pool2d_vjp`."""
    x, dy, geometry = _pool_vjp_arguments(dy, x, kernel_size, stride, padding, ceil_mode)
    dx = np.zeros(x.shape, np.float32)
    _max_pool_vjp(x, dy, *geometry, dx)
    return dx


def avg_pool2d_vjp(dy, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """avg_pool2d's vjp: each window's gradient over its divisor, spread on its real pixels.
    The same bits as the twin, `reference.avg_pool2d_vjp`."""
    x, dy, geometry = _pool_vjp_arguments(dy, x, kernel_size, stride, padding, ceil_mode)
    dx = np.zeros(x.shape, np.float32)
    _avg_pool_vjp(dy, *geometry, bool(count_include_pad), dx)
    return dx
