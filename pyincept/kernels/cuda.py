"""The CUDA kernels: numba.cuda twins of `cpu.py`, with the same names, signatures and numbers.

Everything `cpu.py` does, done on an NVIDIA GPU: im2col, a tiled shared-memory GEMM
whose epilogue adds the bias and applies ReLU, pooling with PyTorch's window rules,
global average pool, concatenation, linear, ReLU and softmax. Activations stay on the
device between layers; only the input goes up (`to_device`) and requested outputs come
back (`to_host`). The readable twins are still the plain-NumPy functions in
`reference.py`; the tests hold this file to `cpu.py` under Numba's CUDA simulator.

What this is not: a cuBLAS/cuDNN binding or a general GPU array library. The GEMM is
a textbook register-tiled kernel (no vector loads, no double buffering, no tensor
cores), so it stays well short of cuBLAS but small enough to read; only float32 and
only what Inception needs.

The GPU is optional. This module is imported only by `kernels.backend("cuda")`, and it
imports cleanly without numba-cuda or without a GPU; `check_available()` then raises a
one-line `PyinceptError` that says what is missing. Kernel bodies are compiled on
first launch, never at import.

Shape legend
------------
N  batch            H, W   input height and width     C  input channels
K  output channels  R, S   kernel height and width    OH, OW  output height, width
M  GEMM rows (output pixels, N*OH*OW)                 D  GEMM depth (R*S*C)
Layout is NHWC everywhere: x[n, h, w, c]. Convolution weights are HWIO: w[r, s, c, k].

Every kernel indexes its arrays through their strides, so an input or an output may be
a channel slice `buf[..., k0:k1]` of a larger activation: that is how a branch writes
straight into its module's concatenated output.
"""

import math
import threading
import warnings

import numpy as np

from .. import config
from ..errors import PyinceptError
from .geometry import adaptive_windows, conv_output_hw, pad4, pair, pool_output_size

DEVICE = "cuda"
HAS_WINOGRAD = False    # no Winograd kernels on the GPU: every conv runs im2col + GEMM

# --- is there a CUDA target at all? --------------------------------------------------
# numba's own `numba.cuda` is deprecated in favour of NVIDIA's numba-cuda package, which
# takes the `numba.cuda` name over when installed (implementation == "NVIDIA").
try:
    from numba import cuda
except Exception as error:  # ImportError, or numba-cuda refusing without cuda-bindings
    cuda = None
    _IMPORT_PROBLEM = " ".join(str(error).split()) or type(error).__name__
else:
    _IMPORT_PROBLEM = None
    if getattr(cuda, "implementation", "") != "NVIDIA":
        cuda = None                              # never compile for the frozen built-in target
        _IMPORT_PROBLEM = "numba's built-in CUDA target is deprecated"

_INSTALL = 'pip install "pyincept[cuda]"'

# Inception's late layers are small (8x8 maps; one image at a time), so many launches use
# fewer than the 128 blocks numba's heuristic asks for and it warns on every such call.
# Here that is by design, not a mistake: only that one message is silenced.
warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU under-utilization")   # numba may colour it


def _simulating():
    """True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 before numba.cuda's import)."""
    try:
        from numba.cuda.core import config as cuda_config      # numba-cuda's own copy
    except ImportError:
        from numba.core import config as cuda_config
    return bool(getattr(cuda_config, "ENABLE_CUDASIM", False))


def _why_unavailable():
    """None when kernels can run here; otherwise one line saying what is missing."""
    if cuda is None:
        return f"device 'cuda' needs the numba-cuda package ({_IMPORT_PROBLEM}): {_INSTALL}"
    if _simulating():
        return None                                  # Python runs every thread: slow, but exact
    try:
        problem = cuda.cuda_error()              # None, or why the driver did not start
        count = 0 if problem else len(cuda.gpus)
    except Exception as error:                   # a driver that starts but then fails
        problem = error
    if problem:
        return f"device 'cuda' found no usable NVIDIA GPU or driver: {' '.join(str(problem).split())}"
    if count == 0:
        return "device 'cuda' found no NVIDIA GPU (is CUDA_VISIBLE_DEVICES hiding it?)"
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return f"device 'cuda' found a GPU but not the CUDA compiler (NVVM) Numba needs: {_INSTALL}"
    return None


def check_available():
    """Raise a one-line PyinceptError unless these kernels can run (a GPU, or the simulator)."""
    problem = _why_unavailable()
    if problem is not None:
        raise PyinceptError(problem)


# Without numba-cuda the kernel bodies stay plain functions, never launched:
# check_available() refuses first.
_jit = cuda.jit(**config.CUDA_JIT_OPTIONS) if cuda is not None else (lambda function: function)

# Elementwise kernels: one thread per output element, in grid-stride loops so a capped
# grid still covers any size. 128 threads a block keeps several blocks per SM resident.
# The simulator starts a Python thread per GPU thread, which costs far more than the
# work each does, so there two blocks loop over everything: the same code, tens of
# times faster.
_THREADS = 128
_MAX_BLOCKS = 2 if cuda is not None and _simulating() else 4096


def _blocks(total):
    return max(1, min(_MAX_BLOCKS, -(-total // _THREADS)))


# --- GEMM with the conv epilogue -------------------------------------------------------
# C = A @ B for A (M, D) and B (D, K), tiled. A block of 16 x 16 threads owns a 64 x 64
# tile of C and walks D in steps of 32. At each step the block copies a 64 x 32 slab of
# A and a 32 x 64 slab of B into shared memory, then every thread multiplies them into
# its 4 x 4 accumulators, kept in registers. Each value fetched from global memory is
# reused 64 times from shared memory, and each shared read 4 times from registers: that
# reuse is what turns a memory-bound loop into a compute-bound GEMM.
#
# Who touches what:
# - fetching, the 256 threads count t = 0..255 (a warp is 32 consecutive t): a warp
#   fetches 32 consecutive floats of one row of A (one 128-byte transaction) and two
#   warps one 64-float row of B, so global reads coalesce and shared stores never
#   collide in a bank;
# - computing, thread (ty, tx) owns rows ty + 16*i and columns tx + 16*j (i, j < 4): a
#   warp reads one value of a_slab per row (a broadcast) and 16 consecutive of b_slab,
#   and a half-warp writes 16 consecutive channels of the output;
# - a_slab rows are padded to 33 floats so that rows ty and ty + 1, read by one warp,
#   sit in different banks.
_TILE = 64                   # edge of the C tile one block computes
_STEP = 32                   # depth of one shared-memory slab
_SIDE = 16                   # threads per side of a block
_PER = _TILE // _SIDE        # 4: each thread's accumulators per side
_FETCHES = _TILE * _STEP // (_SIDE * _SIDE)   # 8 values of each slab per thread per step
_A_ROW = _STEP + 1           # a_slab's padded row (shared-array shapes must be constants)


@_jit
def _gemm_bias_act(a, b, bias, relu, out, m0):
    """out[pixel m0 + m, k] = act(sum_d a[m, d] * b[d, k] + bias[k]) for a (M, D), b (D, K).

    out is (N, OH, OW, K), possibly a channel slice: GEMM row g = m0 + m is output pixel
    (n, oh, ow) = (g // (OH*OW), g // OW % OH, g % OW). Writing the result straight
    there, bias and ReLU applied on the way, means no accumulator buffer, no second pass
    over the output, and no concatenation afterwards.
    """
    M, D = a.shape
    K = b.shape[1]
    OH, OW = out.shape[1], out.shape[2]
    a_slab = cuda.shared.array((_TILE, _A_ROW), np.float32)
    b_slab = cuda.shared.array((_STEP, _TILE), np.float32)
    acc = cuda.local.array((_PER, _PER), np.float32)
    a_col = cuda.local.array(_PER, np.float32)
    b_row = cuda.local.array(_PER, np.float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    t = ty * _SIDE + tx
    row0 = cuda.blockIdx.x * _TILE
    col0 = cuda.blockIdx.y * _TILE
    for i in range(_PER):
        for j in range(_PER):
            acc[i, j] = np.float32(0.0)

    for d0 in range(0, D, _STEP):
        # Stage one slab of A and one of B; zeros past the edges keep the sums exact.
        for f in range(_FETCHES):
            r, d = t // _STEP + f * (_SIDE * _SIDE // _STEP), t % _STEP
            m = row0 + r
            a_slab[r, d] = a[m, d0 + d] if m < M and d0 + d < D else np.float32(0.0)
            d, c = t // _TILE + f * (_SIDE * _SIDE // _TILE), t % _TILE
            k = col0 + c
            b_slab[d, c] = b[d0 + d, k] if d0 + d < D and k < K else np.float32(0.0)
        cuda.syncthreads()
        for d in range(_STEP):
            for i in range(_PER):
                a_col[i] = a_slab[ty + _SIDE * i, d]
            for j in range(_PER):
                b_row[j] = b_slab[d, tx + _SIDE * j]
            for i in range(_PER):
                for j in range(_PER):
                    acc[i, j] += a_col[i] * b_row[j]
        cuda.syncthreads()                      # nobody overwrites a slab still being read

    for i in range(_PER):
        m = row0 + ty + _SIDE * i
        if m < M:
            g = m0 + m
            n, oh, ow = g // (OH * OW), g // OW % OH, g % OW
            for j in range(_PER):
                k = col0 + tx + _SIDE * j
                if k < K:
                    v = acc[i, j] + bias[k]
                    if relu and v < 0.0:
                        v = np.float32(0.0)
                    out[n, oh, ow, k] = v


def _gemm(a, b, bias, relu, out, m0=0):
    """Launch the GEMM for a (M, D) @ b (D, K) into out's pixels m0 .. m0+M-1."""
    M, K = a.shape[0], b.shape[1]
    if M == 0 or K == 0:
        return
    grid = (-(-M // _TILE), -(-K // _TILE))          # rows on x: 2^31 blocks, never runs out
    _gemm_bias_act[grid, (_SIDE, _SIDE)](a, b, bias, bool(relu), out, m0)


# --- convolution -------------------------------------------------------------------------


@_jit
def _im2col(x, R, S, sh, sw, top, left, OH, OW, g0, cols):
    """Unfold output rows g0 .. g0+rows-1 of the batch into cols (rows*OW, R*S*C).

    Row g is image g // OH, output row g % OH; cols[i*OW + ow, (r*S + s)*C + c] =
    x[n, ih, iw, c], zero outside the image. One thread per element of cols, channel
    fastest, so reads and writes both walk memory in order.
    """
    N, H, W, C = x.shape
    P, D = cols.shape
    for e in range(cuda.grid(1), P * D, cuda.gridsize(1)):
        p, col = e // D, e % D
        rs, c = col // C, col % C
        r, s = rs // S, rs % S
        g, ow = g0 + p // OW, p % OW
        n, oh = g // OH, g % OH
        ih = oh * sh - top + r
        iw = ow * sw - left + s
        if 0 <= ih < H and 0 <= iw < W:
            cols[p, col] = x[n, ih, iw, c]
        else:
            cols[p, col] = 0.0                   # padding is never materialised in x


def conv2d(x, w, bias=None, stride=1, padding=0, relu=False, out=None, heads=()):
    """Convolution as im2col + GEMM. x (N,H,W,C), w (R,S,C,K), bias (K,) -> (N,OH,OW,K).

    padding: an int, (pad_h, pad_w) or per side (top, bottom, left, right).
    relu: apply max(0, .) after the bias (the folded BasicConv2d epilogue).
    out: optional (N,OH,OW,K) device array to write into, e.g. a channel slice of a
         concat buffer.
    heads: for a fused 1x1's members, each (k0, bias_i, relu_i, dst) writes the epilogue
         of the raw product's columns k0 .. k0+len(bias_i)-1 into dst (here by bias_act,
         after the product).

    A contiguous 1x1 stride-1 convolution is already a matrix product over pixels and
    goes straight to the GEMM. Anything else is unfolded a tile of output rows at a time
    into a per-thread scratch matrix reused across tiles and calls (at most
    config.CUDA_SCRATCH_FLOATS floats). The GEMM writes bias + ReLU straight into `out`.
    """
    x = _check_nhwc(x, "x")
    w = _contiguous(_as_device(w))
    if w.ndim != 4 or w.shape[2] != x.shape[3]:
        raise ValueError(f"weights must be (R, S, C={x.shape[3]}, K), got {w.shape}")
    R, S, C, K = w.shape
    sh, sw = pair(stride)
    top, bottom, left, right = pad4(padding)
    N, H, W, _ = x.shape
    OH, OW = conv_output_hw(H, W, (R, S), (sh, sw), (top, bottom, left, right))
    if heads and (bias is not None or relu):
        raise ValueError("heads take the raw product: give the conv no bias or relu of its own")
    bias = _zeros(K) if bias is None else _as_device(bias)
    if bias.shape != (K,):
        raise ValueError(f"bias must be ({K},), got {bias.shape}")
    out = _output(out, (N, OH, OW, K))
    wmat = w.reshape(R * S * C, K)                                     # (D, K)

    if (R, S, sh, sw, top, bottom, left, right) == (1, 1, 1, 1, 0, 0, 0, 0) and x.is_c_contiguous():
        _gemm(x.reshape(N * H * W, C), wmat, bias, relu, out)
    else:
        # Tiles of whole output rows, counted across the batch (row g = image g // OH).
        total_rows = N * OH
        D = R * S * C
        rows_per_tile = max(1, min(total_rows, config.CUDA_SCRATCH_FLOATS // max(1, OW * D)))
        cols = _scratch((rows_per_tile * OW, D))
        for g0 in range(0, total_rows, rows_per_tile):
            rows = min(rows_per_tile, total_rows - g0)
            tile = cols[: rows * OW]                                    # (rows*OW, D)
            _im2col[_blocks(rows * OW * D), _THREADS](x, R, S, sh, sw, top, left, OH, OW, g0, tile)
            _gemm(tile, wmat, bias, relu, out, g0 * OW)  # kernels on one stream run in order
    for k0, head_bias, head_relu, dst in heads:
        bias_act(out[..., k0 : k0 + head_bias.shape[0]], head_bias, head_relu, out=dst)
    return out


_buffers = threading.local()   # per thread: concurrent forward passes never share scratch


def _scratch(shape):
    """A reusable (rows, D) float32 device matrix, one per thread (grown, never shrunk)."""
    size = shape[0] * shape[1]
    buf = getattr(_buffers, "cols", None)
    if buf is None or buf.size < size:
        buf = _buffers.cols = _allocate((size,))
    return buf[:size].reshape(shape)


_zero_vectors = {}


def _zeros(K):
    """A cached device vector of K zeros: the bias of a conv that has none."""
    if K not in _zero_vectors:
        _zero_vectors[K] = to_device(np.zeros(K, np.float32))
    return _zero_vectors[K]


# --- the epilogue on its own ------------------------------------------------------------


@_jit
def _bias_act(x, bias, relu, out):
    """out[n, h, w, k] = max(0, x[n, h, w, k] + bias[k]); either may be a channel slice."""
    N, H, W, K = out.shape
    for e in range(cuda.grid(1), N * H * W * K, cuda.gridsize(1)):
        k, p = e % K, e // K
        w, p = p % W, p // W
        h, n = p % H, p // H
        v = x[n, h, w, k] + bias[k]
        if relu and v < 0.0:
            v = np.float32(0.0)
        out[n, h, w, k] = v


def bias_act(x, bias, relu=True, out=None):
    """y = max(0, x + bias) over channels (relu=False: just the bias). x may be a channel slice."""
    x = _check_nhwc(x, "x")
    bias = _as_device(bias)
    if bias.shape != (x.shape[3],):
        raise ValueError(f"bias must be ({x.shape[3]},), got {bias.shape}")
    out = _output(out, x.shape)
    if out.size:
        _bias_act[_blocks(out.size), _THREADS](x, bias, bool(relu), out)
    return out


# --- pooling --------------------------------------------------------------------------------


@_jit
def _pool(x, R, S, sh, sw, ph, pw, is_max, count_include_pad, out):
    """Max or average pooling of x (N,H,W,C) into out (N,OH,OW,C); PyTorch's window rules.

    One thread per output element: the window's rows [h0, h1) run into the padding,
    which ends at H + ph (ceil_mode may hang a window past it: that part never counts).
    """
    N, H, W, C = x.shape
    _, OH, OW, _ = out.shape
    for e in range(cuda.grid(1), N * OH * OW * C, cuda.gridsize(1)):
        c, p = e % C, e // C
        ow, p = p % OW, p // OW
        oh, n = p % OH, p // OH
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        h1 = min(h0 + R, H + ph)
        w1 = min(w0 + S, W + pw)
        a0, a1 = max(h0, 0), min(h1, H)
        b0, b1 = max(w0, 0), min(w1, W)
        if is_max:
            best = -math.inf
            for ih in range(a0, a1):
                for iw in range(b0, b1):
                    v = x[n, ih, iw, c]
                    if v > best or v != v:            # a NaN wins and stays, as in torch
                        best = v
            out[n, oh, ow, c] = best
        else:
            total = np.float32(0.0)                   # float32 sums, as cpu.py
            for ih in range(a0, a1):
                for iw in range(b0, b1):
                    total += x[n, ih, iw, c]
            divisor = (h1 - h0) * (w1 - w0) if count_include_pad else (a1 - a0) * (b1 - b0)
            out[n, oh, ow, c] = total / divisor


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, out=None):
    """Max over each window. Padding never wins: it counts as -infinity."""
    return _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, True, True, out)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, out=None):
    """Mean over each window; count_include_pad decides whether zero padding counts in the divisor."""
    return _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, False, count_include_pad, out)


def _pool_wrapper(x, kernel_size, stride, padding, ceil_mode, is_max, count_include_pad, out):
    x = _check_nhwc(x, "x")                                              # a channel slice is fine
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
    if out.size:
        _pool[_blocks(out.size), _THREADS](x, R, S, sh, sw, ph, pw, bool(is_max), bool(count_include_pad), out)
    return out


@_jit
def _global_avg_pool(x, out):
    """One thread per (n, c): the mean over H*W pixels, summed in float64 as cpu.py."""
    N, H, W, C = x.shape
    for e in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n, c = e // C, e % C
        total = np.float64(0.0)
        for h in range(H):
            for w in range(W):
                total += np.float64(x[n, h, w, c])    # spelt out: the simulator would sum float32
        out[n, 0, 0, c] = total / (H * W)


def global_avg_pool2d(x):
    """Mean over all of H and W: (N, H, W, C) -> (N, 1, 1, C), contiguous (so `.reshape` works)."""
    x = _check_nhwc(x, "x")
    out = empty((x.shape[0], 1, 1, x.shape[3]))
    if out.size:
        _global_avg_pool[_blocks(out.size), _THREADS](x, out)
    return out


@_jit
def _adaptive_avg_pool(x, rows, cols, out):
    """One thread per output value: the mean over its window, summed in float64 as cpu.py."""
    N, OH, OW, C = out.shape
    for e in range(cuda.grid(1), N * OH * OW * C, cuda.gridsize(1)):
        c = e % C
        j = (e // C) % OW
        i = (e // (C * OW)) % OH
        n = e // (C * OW * OH)
        total = np.float64(0.0)
        for h in range(rows[i, 0], rows[i, 1]):
            for w in range(cols[j, 0], cols[j, 1]):
                total += np.float64(x[n, h, w, c])
        out[n, i, j, c] = total / ((rows[i, 1] - rows[i, 0]) * (cols[j, 1] - cols[j, 0]))


def adaptive_avg_pool2d(x, output_size):
    """Mean over each of an output_size grid of PyTorch's adaptive windows: (N, H, W, C) -> (N, OH, OW, C)."""
    x = _check_nhwc(x, "x")
    OH, OW = pair(output_size)
    rows = cuda.to_device(np.array(adaptive_windows(x.shape[1], OH), np.int64).reshape(OH, 2))
    cols = cuda.to_device(np.array(adaptive_windows(x.shape[2], OW), np.int64).reshape(OW, 2))
    out = empty((x.shape[0], OH, OW, x.shape[3]))
    if out.size:
        _adaptive_avg_pool[_blocks(out.size), _THREADS](x, rows, cols, out)
    return out


# --- concatenation, linear, activations ---------------------------------------------------


@_jit
def _copy_into(src, out, k0):
    """out[n, h, w, k0 + k] = src[n, h, w, k]: one branch into its channels of the output."""
    N, H, W, K = src.shape
    for e in range(cuda.grid(1), N * H * W * K, cuda.gridsize(1)):
        k, p = e % K, e // K
        w, p = p % W, p // W
        h, n = p % H, p // H
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
        if a.size:
            _copy_into[_blocks(a.size), _THREADS](a, out, k0)
        k0 += a.shape[3]
    return out


def linear(x, w, bias=None):
    """Fully connected layer. x (N, I), w (I, O) -> (N, O): the same GEMM, bias in its epilogue."""
    x, w = _contiguous(_as_device(x)), _contiguous(_as_device(w))
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"linear: x {x.shape} and w {w.shape} do not chain as (N, I) @ (I, O)")
    N, O = x.shape[0], w.shape[1]
    bias = _zeros(O) if bias is None else _as_device(bias)
    out = empty((N, O))
    _gemm(x, w, bias, False, out.reshape(N, 1, 1, O))      # the epilogue sees N pixels of O channels
    return out


@_jit
def _relu(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        out[i] = v if v > 0.0 else np.float32(0.0)


def relu(x):
    x = _contiguous(_as_device(x))
    out = empty(x.shape)
    if x.size:
        _relu[_blocks(x.size), _THREADS](x.reshape(-1), out.reshape(-1))
    return out


@_jit
def _softmax(x, out):
    """One thread per row: a thousand logits are too few to be worth a block-wide reduction."""
    N, K = x.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        m = -math.inf
        for k in range(K):
            m = max(m, x[n, k])
        total = 0.0
        for k in range(K):
            e = math.exp(x[n, k] - m)         # shifted by the max: exp never overflows
            out[n, k] = e
            total += e
        for k in range(K):
            out[n, k] = out[n, k] / total


def softmax(x):
    """Row-wise softmax over the last axis."""
    x = _contiguous(_as_device(x))
    if x.ndim == 0:
        raise ValueError("softmax needs at least one axis")
    flat = x.reshape(-1, x.shape[x.ndim - 1])          # (the simulator's shapes take no negative index)
    out = empty(flat.shape)
    if flat.shape[0] and flat.shape[1]:
        _softmax[_blocks(flat.shape[0]), _THREADS](flat, out)
    return out.reshape(x.shape)


# --- memory ---------------------------------------------------------------------------------------


def _expand_ellipsis(item, ndim):
    """(..., 64, 128) -> (:, :, :, 64:128) for a 4-D array: numba's DeviceNDArray does not expand `...`."""
    if not isinstance(item, tuple):
        item = (item,)
    places = [i for i, part in enumerate(item) if part is Ellipsis]
    if not places:
        return item
    if len(places) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    at = places[0]
    return item[:at] + (slice(None),) * (ndim - len(item) + 1) + item[at + 1 :]


_DeviceArray = None
if cuda is not None and not _simulating():
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    class _DeviceArray(DeviceNDArray):
        """numba's device array, with channel slicing `a[..., k0:k1]` made possible and cheap.

        layers.py takes branch channels as `out[..., k0:k1]`. DeviceNDArray wants one
        index per axis, and for a strided view it lists every contiguous run of memory
        (a Python loop over N*H*W pixels: 70 ms for a batch of 32 at 35x35) only to learn
        that there is more than one. A strided view needs nothing but its shape, strides
        and first byte. Slices and reshapes keep this class (numba builds them with
        type(self)), so every activation pyincept makes on the GPU has it.
        """

        def __getitem__(self, item):
            item = _expand_ellipsis(item, self.ndim)
            view = self._dummy[item]                        # shape and strides only: no data touched
            if not view.is_array or view.is_c_contig or view.is_f_contig:
                return super().__getitem__(item)            # an element, or one contiguous run
            return type(self)(view.shape, view.strides, self.dtype, stream=self.stream,
                              gpu_data=self.gpu_data.view(*view.extent))


def _allocate(shape):
    shape = tuple(int(s) for s in shape)
    if _DeviceArray is None:                              # the simulator's arrays index like NumPy's
        return cuda.device_array(shape, np.float32)
    strides, step = [], 4
    for size in reversed(shape):                          # C order, float32
        strides.append(step)
        step *= max(size, 1)
    return _DeviceArray(shape, tuple(reversed(strides)), np.float32)


def empty(shape):
    """An uninitialised float32 activation buffer on the GPU."""
    return _allocate(shape)


def map_batch(fn, N):
    """[fn(slice(0, N))]: the GPU takes the whole batch at once (its threads are its own)."""
    return [fn(slice(0, N))]


def to_device(a):
    """Weights or inputs onto the GPU as contiguous float32 (a device array passes through)."""
    if _on_device(a):
        if a.dtype != np.float32:
            raise ValueError(f"device arrays must be float32, got {a.dtype}")
        return a
    host = np.ascontiguousarray(a, dtype=np.float32)
    if _DeviceArray is None:
        return cuda.to_device(host)
    device = _allocate(host.shape)
    if host.size:
        device.copy_to_device(host)
    return device


def pack_weights(w):
    """The weights as conv2d and linear read them on the GPU: a float32 device array (a list
    of arrays: their concatenation along the last axis, a fused 1x1's members)."""
    return to_device(np.concatenate(w, axis=-1) if isinstance(w, (list, tuple)) else w)


def to_host(a):
    """A device array as a NumPy array (a channel slice is compacted on the GPU first)."""
    if not _on_device(a):
        return np.asarray(a)
    return _contiguous(a).copy_to_host()


# --- argument checks --------------------------------------------------------------------------


def _on_device(a):
    """A numba device array (real or the simulator's): what every kernel here launches on."""
    return hasattr(a, "copy_to_host") and hasattr(a, "is_c_contiguous")


def _as_device(a):
    """Device arrays as they are (float32 only); anything else goes up as contiguous float32."""
    return to_device(a)


def _contiguous(a):
    """a itself if C-contiguous, else a contiguous copy made on the GPU (4-D) or via the host."""
    if a.is_c_contiguous():
        return a
    if a.ndim == 4:
        return concat_channels([a])
    return to_device(a.copy_to_host())       # pyincept only ever slices 4-D activations


def _check_nhwc(x, name):
    x = _as_device(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC (N, H, W, C), got shape {x.shape}")
    return x


def _output(out, shape):
    if out is None:
        return empty(shape)
    if not _on_device(out):
        raise ValueError(f"out must be a device array (kernels.cuda.empty), got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    return out
