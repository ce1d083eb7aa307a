"""The per-channel kernels on the CPU: the bias + ReLU epilogue every conv ends with,
concatenation, linear layers (pyincept's GEMM), ReLU and softmax.
The readable twins are in `reference.py`; the shape letters are `cpu.py`'s.
"""

import numpy as np

from .gemm import gemm, gemm_into, pack_weights, padded_bias
from .runtime import F0, _as_f32, _channel_window, _check_nhwc, _jit, _output, _output_window, _side_by_side


@_jit
def _finish_rows(src, s0, bias, relu, dst, d0, first, last):
    """The conv epilogue on rows first .. last-1: dst[i, d0 + k] = max(0, src[i, s0 + k] + bias[k])
    for k < K = len(bias). src and dst are whole C-contiguous (M, *) arrays, or one array:
    a branch's columns are passed as their parent and first column (`_channel_window`),
    which is how a branch writes straight into its module's concatenated output. With
    the layout known LLVM vectorises the loop: 5x faster than on the strided slices."""
    K = bias.shape[0]
    for i in range(first, last):
        a = src[i, s0 : s0 + K]                         # indexed from 0: no negative-index checks
        b = dst[i, d0 : d0 + K]
        for k in range(K):
            v = a[k] + bias[k]
            if relu and v < 0.0:
                v = F0
            b[k] = v


def bias_act(x, bias, relu=True, out=None):
    """y = max(0, x + bias) over channels (relu=False: just the bias). x may be a channel slice."""
    x = _check_nhwc(x, "x", contiguous=False)
    bias = _as_f32(bias)
    if bias.shape != (x.shape[3],):
        raise ValueError(f"bias must be ({x.shape[3]},), got {bias.shape}")
    out = _output(out, x.shape)
    src, s0 = _channel_window(x)
    window = _output_window(out)
    if window is None:
        np.copyto(out, bias_act(x, bias, relu))
        return out
    dst, d0 = window
    src, dst = _pixels(src), _pixels(dst)                              # (M, *) both
    _side_by_side(lambda first, last: _finish_rows(src, s0, bias, relu, dst, d0, first, last), len(src),
                  ops=out.size)
    return out


def _pixels(a):
    """(N, H, W, K) -> a (N*H*W, K) view of the same memory (a channel slice stays a view)."""
    view = a.view()
    view.shape = (a.shape[0] * a.shape[1] * a.shape[2], a.shape[3])   # raises rather than copy
    return view


# --- concatenation, linear, activations -------------------------------------------


@_jit
def _copy_into(src, out, k0):
    N, H, W, K = src.shape
    for job in range(N * H):
        n = job // H
        h = job % H
        for w in range(W):
            for k in range(K):
                out[n, h, w, k0 + k] = src[n, h, w, k]


def concat_channels(arrays, out=None):
    """Stack branch outputs along channels: [(N,H,W,K_i)] -> (N,H,W,sum K_i).

    Inception modules avoid calling this: their branches write straight into slices
    of `out`. It is here for anything assembled after the fact.
    """
    arrays = [_check_nhwc(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    if not arrays:
        raise ValueError("concat_channels needs at least one array")
    N, H, W, _ = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape[:3] != (N, H, W):
            raise ValueError(f"arrays[{i}] has shape {a.shape}, expected ({N}, {H}, {W}, *)")
    out = _output(out, (N, H, W, sum(a.shape[3] for a in arrays)))
    k0 = 0
    for a in arrays:
        _copy_into(a, out, k0)
        k0 += a.shape[3]
    return out


def linear(x, w, bias=None):
    """Fully connected layer. x (N, I), w (I, O) or its Panels -> (N, O), the bias added in
    the product's registers. One FMA chain per output (kernels/gemm.py): each image's
    outputs are the same bits alone and in any batch. A lone image is bound by reading w,
    so its two threads take half the weight panels each."""
    x = np.ascontiguousarray(_as_f32(x))
    panels = pack_weights(w)
    if x.ndim != 2 or panels.ndim != 2 or x.shape[1] != panels.depth:
        raise ValueError(f"linear: x {x.shape} and w {panels.shape} do not chain as (N, I) @ (I, O)")
    N, O = x.shape[0], panels.columns
    if x.shape[1] == 0:
        return gemm(x, panels, bias)
    out = np.empty((N, O), np.float32)
    epilogue = padded_bias(bias, O, panels.path) if bias is not None else None
    _side_by_side(lambda j0, j1: gemm_into(x, panels, out, 0, N, j0, j1, epilogue), panels.data.shape[0], smallest=2)
    return out


def linear_vjp(dy, x, w, params=True):
    """linear's vector-Jacobian product: dy (N, O) -> dx = dy @ Wt (N, I), and with `params`
    dw = xt @ dy (I, O) and db (O,) (else None), each product by the rule (kernels/gemm.py);
    an image's dx is the same bits alone or in any batch. Twin: `reference.linear_vjp`."""
    x = np.ascontiguousarray(_as_f32(x))
    w = w.unpack() if hasattr(w, "unpack") else _as_f32(w)
    dy = np.ascontiguousarray(_as_f32(dy))
    if dy.shape != (x.shape[0], w.shape[1]) or x.shape[1] != w.shape[0]:
        raise ValueError(f"linear_vjp: dy {dy.shape}, x {x.shape} and w {w.shape} do not chain")
    dx = gemm(dy, np.ascontiguousarray(w.T))                          # (N, O) @ (O, I)
    if not params:
        return dx, None, None
    return dx, gemm(np.ascontiguousarray(x.T), dy), dy.sum(axis=0, dtype=np.float64).astype(np.float32)


@_jit
def _relu(x, out):
    flat_in = x.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(flat_in.size):
        v = flat_in[i]
        flat_out[i] = v if v > 0.0 else 0.0


def relu(x):
    x = np.ascontiguousarray(_as_f32(x))
    out = np.empty_like(x)
    _relu(x, out)
    return out


@_jit
def _softmax(x, out):
    N, K = x.shape
    for n in range(N):
        m = -np.inf
        for k in range(K):
            m = max(m, x[n, k])
        total = 0.0
        for k in range(K):
            e = np.exp(x[n, k] - m)          # shifted by the max: exp never overflows
            out[n, k] = e
            total += e
        for k in range(K):
            out[n, k] = out[n, k] / total


def softmax(x):
    """Row-wise softmax over the last axis."""
    x = _as_f32(x)
    flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(flat)
    _softmax(flat, out)
    return out.reshape(x.shape)
