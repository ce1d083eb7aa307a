"""The fast CPU kernels: Numba-compiled im2col, pooling, concatenation and epilogues.

Each kernel is a private jitted body (`_im2col`, `_max_pool`, ...) behind a small
public wrapper that checks shapes and dtypes, allocates the output and calls it.
Every public function here has a plain-NumPy twin of the same name and signature
in `reference.py`; read that one first. The matrix products themselves go to
NumPy's BLAS (`np.matmul`), which runs near the machine's peak; Numba handles the
memory-bound data movement around them.

Shape legend
------------
N  batch            H, W   input height and width     C  input channels
K  output channels  R, S   kernel height and width    OH, OW  output height, width
Layout is NHWC everywhere: x[n, h, w, c]. Convolution weights are HWIO: w[r, s, c, k].

What this is not: a general tensor library. Only float32, only what Inception needs.
"""

import threading
import weakref

import numba
import numpy as np
from numba import njit, prange

from .. import config
from .geometry import conv_output_size, pad4, pair, pool_output_size

# Chosen once, before any parallel kernel runs (see config.THREADING_LAYER for why).
numba.config.THREADING_LAYER = config.THREADING_LAYER


def set_num_threads(n):
    """Threads for the Numba kernels and for the BLAS that runs the GEMMs.

    There is one BLAS pool: NumPy's OpenBLAS, called from Python between kernels (no
    Numba kernel calls np.dot, which would wake SciPy's separate OpenBLAS). Numba and
    BLAS take turns, but OpenBLAS's idle threads yield-spin for a while after each GEMM:
    the benchmark suite measures ~20k involuntary context switches per second, an open
    lead for issue 4.
    """
    from threadpoolctl import threadpool_limits

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    threadpool_limits(n, user_api="blas")
    return n


if config.threads_from_environment() is not None:
    set_num_threads(config.threads_from_environment())
else:
    numba.set_num_threads(min(config.num_threads(), numba.config.NUMBA_NUM_THREADS))

_jit = njit(**config.JIT_OPTIONS)
_jit_parallel = njit(**config.PARALLEL_JIT_OPTIONS)


# --- convolution ------------------------------------------------------------------


@_jit_parallel
def _im2col(x, R, S, sh, sw, top, left, OH, OW, g0, rows, cols):
    """Unfold output rows g0 .. g0+rows-1 of the whole batch into cols (rows*OW, R*S*C).

    Output row g is image n = g // OH, row oh = g % OH, so a tile may span images and
    the GEMM after it sees many images' pixels at once (taller, faster matrices for
    the 17x17 and 8x8 modules). cols[i*OW + ow, (r*S + s)*C + c] = x[n, ih, iw, c],
    zero outside the image: padding is never materialised.
    """
    N, H, W, C = x.shape
    for i in prange(rows):
        n = (g0 + i) // OH
        oh = (g0 + i) % OH
        for ow in range(OW):
            row = i * OW + ow
            for r in range(R):
                ih = oh * sh - top + r
                for s in range(S):
                    iw = ow * sw - left + s
                    base = (r * S + s) * C
                    if 0 <= ih < H and 0 <= iw < W:
                        cols[row, base : base + C] = x[n, ih, iw, :]
                    else:
                        cols[row, base : base + C] = 0.0


@_jit_parallel
def _bias_act(acc, bias, relu, out):
    """The conv epilogue: out[n, h, w, k] = max(0, acc[n, h, w, k] + bias[k]).

    Either array may be a strided channel slice of a larger buffer: that is how a
    branch writes straight into its module's concatenated output, with no copy later,
    and how the fused 1x1 GEMM of a module hands each branch its columns.
    """
    N, H, W, K = out.shape
    for job in prange(N * H):
        n = job // H
        h = job % H
        for w in range(W):
            for k in range(K):
                v = acc[n, h, w, k] + bias[k]
                if relu and v < 0.0:
                    v = 0.0
                out[n, h, w, k] = v


def bias_act(x, bias, relu=True, out=None):
    """y = max(0, x + bias) over channels (relu=False: just the bias). x may be a channel slice."""
    x = _check_nhwc(x, "x", contiguous=False)
    bias = _as_f32(bias)
    if bias.shape != (x.shape[3],):
        raise ValueError(f"bias must be ({x.shape[3]},), got {bias.shape}")
    out = _output(out, x.shape)
    _bias_act(x, bias, relu, out)
    return out


def conv2d(x, w, bias=None, stride=1, padding=0, relu=False, out=None):
    """Convolution as im2col + GEMM. x (N,H,W,C), w (R,S,C,K), bias (K,) -> (N,OH,OW,K).

    padding: an int, (pad_h, pad_w) or per side (top, bottom, left, right).
    relu: apply max(0, .) after the bias (the folded BasicConv2d epilogue).
    out: optional (N,OH,OW,K) float32 array to write into, e.g. a channel slice of a
         concat buffer.

    A 1x1 stride-1 convolution is already a matrix product over pixels, so it skips
    im2col: (N*H*W, C) @ (C, K). Anything else unfolds a tile of output rows at a time
    (rows of several images when they fit) into a scratch matrix reused across tiles and
    calls, which bounds the extra memory (the unfolded patches are R*S times the input)
    to _SCRATCH_FLOATS.
    The GEMM writes straight into `out` when `out` is contiguous; the bias and ReLU
    then run in place.
    """
    x = _check_nhwc(x, "x")
    w = _as_f32(w)
    if w.ndim != 4 or w.shape[2] != x.shape[3]:
        raise ValueError(f"weights must be (R, S, C={x.shape[3]}, K), got {w.shape}")
    R, S, C, K = w.shape
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, _ = x.shape
    OH = conv_output_size(H, R, sh, top, bottom)
    OW = conv_output_size(W, S, sw, left, right)
    if OH < 1 or OW < 1:
        raise ValueError(f"input {H}x{W} is smaller than kernel {R}x{S} with padding {(top, bottom, left, right)}")
    if bias is not None:
        bias = _as_f32(bias)
        if bias.shape != (K,):
            raise ValueError(f"bias must be ({K},), got {bias.shape}")
    out = _output(out, (N, OH, OW, K))
    wmat = w.reshape(R * S * C, K)                                     # (R*S*C, K)
    # GEMM target: `out` itself when its rows are contiguous, else a scratch buffer.
    direct = out.flags.c_contiguous
    acc = out if direct else _scratch("acc", (N, OH, OW, K))

    if (R, S, sh, sw, top, bottom, left, right) == (1, 1, 1, 1, 0, 0, 0, 0):
        np.matmul(x.reshape(N * H * W, C), wmat, out=acc.reshape(N * H * W, K))
    else:
        # Tiles of whole output rows, counted across the batch (row g = image g // OH).
        total_rows = N * OH
        rows_per_tile = max(1, min(total_rows, _SCRATCH_FLOATS // max(1, OW * R * S * C)))
        cols = _scratch("cols", (rows_per_tile * OW, R * S * C))
        acc_rows = acc.reshape(total_rows * OW, K)                     # (N*OH*OW, K)
        for g0 in range(0, total_rows, rows_per_tile):
            rows = min(rows_per_tile, total_rows - g0)
            tile = cols[: rows * OW]                                    # (rows*OW, R*S*C)
            _im2col(x, R, S, sh, sw, top, left, OH, OW, g0, rows, tile)
            np.matmul(tile, wmat, out=acc_rows[g0 * OW : (g0 + rows) * OW])
    if bias is not None or relu or not direct:
        _bias_act(acc, bias if bias is not None else _zeros(K), relu, out)
    return out


# Unfolded patches of one tile must fit here: 4M floats = 16 MB, below glibc's 32 MB
# mmap threshold, and reused across calls, so no page is faulted in twice.
_SCRATCH_FLOATS = 4 << 20
_scratch_buffers = threading.local()   # one set per thread: concurrent forward passes never share


def _scratch(role, shape):
    """A reusable float32 buffer of at least `shape`, one per role and thread (grown, never shrunk)."""
    buffers = _scratch_buffers.__dict__
    size = int(np.prod(shape))
    buf = buffers.get(role)
    if buf is None or buf.size < size:
        buf = buffers[role] = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def _zeros(K):
    return np.zeros(K, np.float32)


# --- pooling ----------------------------------------------------------------------


@_jit_parallel
def _pool(x, R, S, sh, sw, ph, pw, is_max, count_include_pad, out):
    """Max or average pooling of x (N,H,W,C) into out (N,OH,OW,C); PyTorch's window rules.

    The innermost loop runs over channels, which are contiguous in NHWC: each window
    pixel updates a whole channel vector at once.
    """
    N, H, W, C = x.shape
    _, OH, OW, _ = out.shape
    for job in prange(N * OH):
        n = job // OH
        oh = job % OH
        h0 = oh * sh - ph
        h1 = min(h0 + R, H + ph)
        a0, a1 = max(h0, 0), min(h1, H)
        acc = np.empty(C, np.float32)
        for ow in range(OW):
            w0 = ow * sw - pw
            w1 = min(w0 + S, W + pw)
            b0, b1 = max(w0, 0), min(w1, W)
            if is_max:
                acc[:] = -np.inf
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        for c in range(C):
                            v = x[n, ih, iw, c]
                            if v > acc[c] or v != v:      # a NaN wins and stays, as in torch
                                acc[c] = v
            else:
                acc[:] = 0.0
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        for c in range(C):
                            acc[c] += x[n, ih, iw, c]
                divisor = (h1 - h0) * (w1 - w0) if count_include_pad else (a1 - a0) * (b1 - b0)
                for c in range(C):
                    acc[c] /= divisor
            out[n, oh, ow, :] = acc


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
    _pool(x, R, S, sh, sw, ph, pw, is_max, count_include_pad, out)
    return out


@_jit_parallel
def _global_avg_pool(x, out):
    N, H, W, C = x.shape
    for n in prange(N):
        for c in range(C):
            total = 0.0
            for h in range(H):
                for w in range(W):
                    total += x[n, h, w, c]
            out[n, 0, 0, c] = total / (H * W)


def global_avg_pool2d(x):
    """Mean over all of H and W: (N, H, W, C) -> (N, 1, 1, C). Accumulates in float64."""
    x = _check_nhwc(x, "x")
    out = np.empty((x.shape[0], 1, 1, x.shape[3]), np.float32)
    _global_avg_pool(x, out)
    return out


# --- concatenation, linear, activations -------------------------------------------


@_jit_parallel
def _copy_into(src, out, k0):
    N, H, W, K = src.shape
    for job in prange(N * H):
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
    """Fully connected layer. x (N, I), w (I, O) -> (N, O): one GEMM, then the bias epilogue."""
    x, w = _as_f32(x), _as_f32(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"linear: x {x.shape} and w {w.shape} do not chain as (N, I) @ (I, O)")
    bias = np.zeros(w.shape[1], np.float32) if bias is None else _as_f32(bias)
    acc = np.matmul(x, w)
    _bias_act(acc[None, None], bias, False, acc[None, None])   # in place; the epilogue sees (1, 1, N, O)
    return acc


@_jit_parallel
def _relu(x, out):
    flat_in = x.reshape(-1)
    flat_out = out.reshape(-1)
    for i in prange(flat_in.size):
        v = flat_in[i]
        flat_out[i] = v if v > 0.0 else 0.0


def relu(x):
    x = np.ascontiguousarray(_as_f32(x))
    out = np.empty_like(x)
    _relu(x, out)
    return out


@_jit_parallel
def _softmax(x, out):
    N, K = x.shape
    for n in prange(N):
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


# --- memory: the CPU's device is the host ---------------------------------------------


class Arena:
    """Recycles activation buffers between forward passes.

    Why: glibc hands every allocation over 32 MB to mmap and returns it to the kernel
    on free, so a fresh batch-8 stem activation is page-faulted and zeroed on every
    call. Here a buffer whose array has died goes on a free list keyed by its size,
    and the next request of that size (the same layer, next call) takes it back.

    Liveness is Python's own. Each array handed out is built on a fresh `_Lease` object
    (through the array interface), so it and every view of it (a channel slice, a
    reshape) keep that lease alive; `weakref.finalize` fires when the last of them is
    gone. Nothing still in use is ever reused, and the arena holds at most the largest
    set of buffers that were alive at once, per size.
    """

    def __init__(self, min_bytes=1 << 20):
        self.min_bytes = min_bytes          # small arrays: malloc's free lists are fine
        self.free = {}                      # nbytes -> [flat float32 buffers]
        self.lock = threading.Lock()

    def empty(self, shape):
        size = int(np.prod(shape))
        if size * 4 < self.min_bytes:
            return np.empty(shape, np.float32)
        with self.lock:
            spare = self.free.get(size)
            base = spare.pop() if spare else None
        if base is None:
            base = np.empty(size, np.float32)
        lease = _Lease(base, shape)
        weakref.finalize(lease, self._release, base)
        return np.asarray(lease)

    def _release(self, base):
        with self.lock:
            self.free.setdefault(base.size, []).append(base)

    def clear(self):
        """Give every spare buffer back to the allocator."""
        with self.lock:
            self.free.clear()


class _Lease:
    """One loan of an arena buffer: the object every array and view of this loan points to."""

    def __init__(self, base, shape):
        self.base = base
        self.__array_interface__ = dict(base.__array_interface__, shape=tuple(shape), strides=None)


ARENA = Arena()


def empty(shape):
    """An uninitialised float32 activation buffer (recycled through ARENA when large)."""
    return ARENA.empty(shape)


def to_device(a):
    """Weights or inputs onto this backend's memory: for the CPU, a contiguous float32 array."""
    return np.ascontiguousarray(a, dtype=np.float32)


def to_host(a):
    """This backend's array as a NumPy array (the CPU's already is)."""
    return a


# --- argument checks --------------------------------------------------------------


def _as_f32(a):
    return np.asarray(a, dtype=np.float32)


def _check_nhwc(x, name, contiguous=True):
    x = np.asarray(x, dtype=np.float32)
    if contiguous:
        x = np.ascontiguousarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC (N, H, W, C), got shape {x.shape}")
    return x


def _output(out, shape):
    if out is None:
        return empty(shape)
    if out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    return out
