"""pyincept: Inception v3 from scratch in NumPy and Numba.

The public API:

    import pyincept
    model = pyincept.inception_v3("inception_v3.npz")   # or weights=None: seeded random init
    logits = model(x)                                    # x: float32 NHWC (N, H, W, 3) -> (N, 1000)
    acts = model.run(x, ["Mixed_5b.branch_pool"])        # any named layer's NHWC output

    pyincept.convert_checkpoint("inception_v3_google-0cc3c7bd.pth", "inception_v3.npz")
    path = pyincept.fetch_weights()                      # download, verify, convert, cache

Kernels (fast and reference) live in `pyincept.kernels`.
"""

from .errors import CheckpointError, DownloadError, PyinceptError, WeightsError
from .inception_v3 import Inception3, inception_v3
from .weights import convert_checkpoint, load_weights, save_weights

__version__ = "0.1.0"


def fetch_weights(*args, **kwargs):
    """Download, verify and convert the published checkpoint; see `pyincept.fetch.fetch_weights`."""
    from .fetch import fetch_weights as _fetch

    return _fetch(*args, **kwargs)


__all__ = [
    "CheckpointError",
    "DownloadError",
    "Inception3",
    "PyinceptError",
    "WeightsError",
    "convert_checkpoint",
    "fetch_weights",
    "inception_v3",
    "load_weights",
    "save_weights",
]
