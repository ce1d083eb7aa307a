"""pyincept: the Inception family from scratch in NumPy and Numba.

The public API:

    import pyincept
    pyincept.models()                                    # ['googlenet', 'inception_v3', 'inception_v3_fid']
    model = pyincept.inception_v3("inception_v3.npz")   # or weights=None: seeded random init
    model = pyincept.load_model("googlenet.npz")        # whichever model the file holds
    model = pyincept.create_model("googlenet", device="reference")   # the plain-NumPy twins
    logits = model(x)                                    # x: float32 NHWC (N, H, W, 3) -> (N, 1000)
    acts = model.run(x, ["Mixed_5b.branch_pool"])        # any named layer's NHWC output

    pyincept.convert_checkpoint("googlenet-1378be20.pth", "googlenet.npz")   # recognises the model
    path = pyincept.fetch_weights("googlenet")           # download, verify, convert, cache

    image = pyincept.load_image("photo.jpg")             # any Pillow mode -> RGB, EXIF-oriented
    x = pyincept.preprocess(image)                       # (299, 299, 3): torchvision's recipe
    for result in pyincept.classify(["a.jpg", "b.png"], model, top=5):
        print(result.path, result.top or result.error)
    grid = pyincept.activation_grid(acts["Mixed_5b.branch_pool"], cols=4)   # uint8 picture
    scores = pyincept.calculate_metrics("fake/", "real/", fid=True, kid=True, isc=True,
                                        protocol="torch-fidelity", weights="fid.npz")   # FID, KID, IS
    head, report = pyincept.retrain("photos/", model)    # a new softmax layer on the bottlenecks
    pyincept.attach_head(model, head)                    # model(x) -> (N, K); model.labels

Kernels (fast and reference) live in `pyincept.kernels`.
"""

from .errors import CheckpointError, DownloadError, PyinceptError, WeightsError
from .finetune import FineTuned, fine_tune
from .io.convert import convert_checkpoint
from .io.npz import load_weights, save_weights
from .kernels.cpu import set_num_threads
from .labels import imagenet_labels
from .metrics import FeatureStats, calculate_metrics, compute_statistics
from .models.googlenet import GoogLeNet
from .models.inception_v3 import Inception3
from .models.registry import create_model, detect_model, googlenet, inception_v3, load_model, models
from .predict import Prediction, classify, find_images
from .preprocess import ImageError, load_image, preprocess, preprocess_batch
from .retrain import Head, attach_head, retrain
from .visualize import activation_grid, save_grid

__version__ = "0.1.0"


def fetch_weights(*args, **kwargs):
    """Download, verify and convert a model's published checkpoint; see `pyincept.io.fetch.fetch_weights`."""
    from .io.fetch import fetch_weights as _fetch

    return _fetch(*args, **kwargs)


__all__ = [
    "CheckpointError",
    "Head",
    "DownloadError",
    "FeatureStats",
    "FineTuned",
    "GoogLeNet",
    "ImageError",
    "Inception3",
    "Prediction",
    "PyinceptError",
    "WeightsError",
    "activation_grid",
    "attach_head",
    "calculate_metrics",
    "classify",
    "compute_statistics",
    "convert_checkpoint",
    "create_model",
    "detect_model",
    "fetch_weights",
    "find_images",
    "fine_tune",
    "googlenet",
    "imagenet_labels",
    "inception_v3",
    "load_image",
    "load_model",
    "load_weights",
    "models",
    "preprocess",
    "preprocess_batch",
    "retrain",
    "save_grid",
    "save_weights",
    "set_num_threads",
]
