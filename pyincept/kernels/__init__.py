"""Kernels: the fast Numba CPU versions, re-exported here; plain-NumPy twins in `reference`.

Model code imports kernels from this package only, never numba itself.
"""

from .cpu import (
    avg_pool2d,
    bias_act,
    concat_channels,
    conv2d,
    global_avg_pool2d,
    linear,
    max_pool2d,
    relu,
    softmax,
)

__all__ = [
    "avg_pool2d",
    "bias_act",
    "concat_channels",
    "conv2d",
    "global_avg_pool2d",
    "linear",
    "max_pool2d",
    "relu",
    "softmax",
]
