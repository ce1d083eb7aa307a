"""Kernels: the fast Numba CPU versions, re-exported here; plain-NumPy twins in `reference`;
numba.cuda twins in `cuda` (imported only when asked for).

Model code imports kernels from this package only, never numba itself. A kernel set
(this package, or `cuda`) is what `backend(device)` returns: the same functions, each
working on that device's arrays, plus `empty`, `to_device`, `to_host` and `map_batch`
(how a batch is split across the device's threads).
"""

import sys

from ..errors import PyinceptError

from .cpu import (
    avg_pool2d,
    bias_act,
    concat_channels,
    conv2d,
    conv2d_winograd,
    empty,
    global_avg_pool2d,
    linear,
    map_batch,
    max_pool2d,
    relu,
    softmax,
    to_device,
    to_host,
    winograd_tile,
    winograd_weights,
)

__all__ = [
    "avg_pool2d",
    "bias_act",
    "concat_channels",
    "conv2d",
    "conv2d_winograd",
    "empty",
    "global_avg_pool2d",
    "linear",
    "map_batch",
    "max_pool2d",
    "relu",
    "softmax",
    "to_device",
    "to_host",
    "winograd_tile",
    "winograd_weights",
]

DEVICE = "cpu"


def backend(device):
    """The kernel set for "cpu" or "cuda". CUDA is imported only here, and says clearly what is missing."""
    if device == "cpu":
        return sys.modules[__name__]
    if device == "cuda":
        from . import cuda

        cuda.check_available()
        return cuda
    raise PyinceptError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
