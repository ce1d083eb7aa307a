"""Kernels: the fast Numba CPU versions (`cpu`, re-exported here), their plain-NumPy twins
(`reference`), and numba.cuda twins (`cuda`, imported only when asked for).

Model code imports kernels from this package only, never numba itself. A backend is a module
that provides every name in `CONTRACT`, each working on that device's arrays, with the same
signatures: the math kernels, plus `empty`, `to_device`, `to_host`, `pack_weights` (a
weight matrix or filter bank in the form that device's conv2d and linear read, made once
at load) and `map_batch` (how a batch is split across the device's threads), `DEVICE` (its name) and `HAS_WINOGRAD` (whether it
has the Winograd kernels, `WINOGRAD_CONTRACT`). `backend(device)` returns one, checked.
"""

import sys

from ..errors import PyinceptError

from .cpu import (
    DEVICE,
    HAS_WINOGRAD,
    adaptive_avg_pool2d,
    avg_pool2d,
    bias_act,
    adaptive_avg_pool2d_vjp,
    avg_pool2d_vjp,
    concat_channels,
    concat_channels_vjp,
    conv2d,
    conv2d_vjp,
    conv2d_winograd,
    empty,
    global_avg_pool2d,
    global_avg_pool2d_vjp,
    linear,
    linear_vjp,
    log_softmax,
    log_softmax_vjp,
    map_batch,
    max_pool2d,
    max_pool2d_vjp,
    pack_weights,
    relu,
    relu_vjp,
    softmax,
    softmax_vjp,
    to_device,
    to_host,
    winograd_tile,
    winograd_weights,
)

# What every backend provides (a test holds cpu, reference and cuda to it).
CONTRACT = (
    "DEVICE", "HAS_WINOGRAD",
    "conv2d", "bias_act", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "adaptive_avg_pool2d",
    "concat_channels", "linear", "relu", "softmax",
    "empty", "to_device", "to_host", "map_batch", "pack_weights",
)
# ... and, where HAS_WINOGRAD is True, these.
WINOGRAD_CONTRACT = ("conv2d_winograd", "winograd_tile", "winograd_weights")
# The backward pass (`Network.vjp`): each forward's vector-Jacobian product, where the
# backend has them (cpu and reference; `missing_backward` names what another lacks).
BACKWARD_CONTRACT = (
    "conv2d_vjp", "max_pool2d_vjp", "avg_pool2d_vjp", "global_avg_pool2d_vjp", "adaptive_avg_pool2d_vjp",
    "concat_channels_vjp", "linear_vjp", "relu_vjp", "softmax_vjp", "log_softmax", "log_softmax_vjp",
)
DEVICES = ("cpu", "reference", "cuda")

__all__ = [
    "BACKWARD_CONTRACT",
    "CONTRACT",
    "DEVICES",
    "WINOGRAD_CONTRACT",
    "backend",
    "missing_backward",
    "missing_from_contract",
    *sorted(name for name in CONTRACT + WINOGRAD_CONTRACT + BACKWARD_CONTRACT if name not in ("DEVICE", "HAS_WINOGRAD")),
]


def missing_backward(module):
    """The backward pass's kernels `module` lacks (empty where `Network.vjp` can run on it)."""
    return [name for name in BACKWARD_CONTRACT if not hasattr(module, name)]


def missing_from_contract(module):
    """The names of the contract `module` lacks (empty for a complete backend)."""
    wanted = CONTRACT + (WINOGRAD_CONTRACT if getattr(module, "HAS_WINOGRAD", False) else ())
    return [name for name in wanted if not hasattr(module, name)]


def backend(device):
    """The kernel set for "cpu", "reference" or "cuda". CUDA is imported only here, and says
    clearly what is missing; "reference" runs every layer on the plain-NumPy twins."""
    if device == "cpu":
        module = sys.modules[__name__]
    elif device == "reference":
        from . import reference as module
    elif device == "cuda":
        from . import cuda as module

        module.check_available()
    else:
        raise PyinceptError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    missing = missing_from_contract(module)
    if missing:
        raise PyinceptError(f"the {device} backend lacks {', '.join(missing)}")
    return module
