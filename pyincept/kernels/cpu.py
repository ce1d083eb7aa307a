"""The fast CPU backend: every kernel of the contract (`kernels.CONTRACT`), gathered from the
files that hold them, split by concern:

    gemm.py      the matrix product: one FMA chain per output, an llvmlite micro-kernel per
                 SIMD path, weights packed once into panels (`pack_weights`)
    runtime.py   threads, the lone image's helper, memory, argument checks
    conv.py      convolution: im2col (Numba) + GEMM + epilogue in its registers
    winograd.py  Winograd convolution: transforms (Numba) + point GEMMs
    pool.py      max, average, global and adaptive average pooling
    dense.py     the bias + ReLU epilogue, concatenation, linear, ReLU, softmax

Each kernel is a private jitted body (`_unfold`, `_pool`, ...) behind a small public
wrapper that checks shapes and dtypes, allocates the output and calls it. Every public
function here has a plain-NumPy twin of the same name and signature in `reference.py`;
read that one first. The matrix products are pyincept's own (gemm.py, twin
`reference.gemm`), at the core's FMA peak and the same bits on every CPU; serial Numba
kernels handle the memory-bound data movement around them.

Shape legend (every kernel file)
--------------------------------
N  batch            H, W   input height and width     C  input channels
K  output channels  R, S   kernel height and width    OH, OW  output height, width
Layout is NHWC everywhere: x[n, h, w, c]. Convolution weights are HWIO: w[r, s, c, k].

What this is not: a general tensor library. Only float32, only what Inception needs.
"""

from .conv import conv2d, conv2d_vjp
from .gemm import pack_weights
from .dense import bias_act, concat_channels, linear, linear_vjp, relu, softmax
from .pool import adaptive_avg_pool2d, avg_pool2d, avg_pool2d_vjp, global_avg_pool2d, max_pool2d, max_pool2d_vjp
# The backward's other light steps run on their NumPy twins, vectorised (the global and
# adaptive pools, ReLU, concatenation, softmax); its products are the GEMM's.
from .reference import (
    adaptive_avg_pool2d_vjp, concat_channels_vjp, global_avg_pool2d_vjp, log_softmax, log_softmax_vjp, relu_vjp,
    softmax_vjp,
)
from .runtime import ARENA, Arena, empty, get_num_threads, map_batch, set_num_threads, to_device, to_host
from .winograd import conv2d_winograd, winograd_tile, winograd_weights

DEVICE = "cpu"
HAS_WINOGRAD = True             # conv2d_winograd, winograd_tile, winograd_weights

__all__ = [
    "ARENA", "Arena", "DEVICE", "HAS_WINOGRAD", "adaptive_avg_pool2d", "adaptive_avg_pool2d_vjp", "avg_pool2d",
    "avg_pool2d_vjp", "bias_act", "concat_channels", "concat_channels_vjp", "conv2d", "conv2d_vjp", "conv2d_winograd",
    "empty", "get_num_threads", "global_avg_pool2d", "global_avg_pool2d_vjp", "linear", "linear_vjp", "log_softmax",
    "log_softmax_vjp", "map_batch", "max_pool2d", "max_pool2d_vjp", "pack_weights", "relu", "relu_vjp",
    "set_num_threads", "softmax", "softmax_vjp", "to_device", "to_host", "winograd_tile", "winograd_weights",
]
