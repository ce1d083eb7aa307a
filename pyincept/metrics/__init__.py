"""FID, KID and Inception Score with the FID Inception, matching pytorch-fid, torch-fidelity and clean-fid.

    from pyincept.metrics import calculate_metrics
    scores = calculate_metrics("fake/", "real/", fid=True, kid=True, isc=True,
                               protocol="torch-fidelity", weights="fid.npz")

    protocols.py   each tool's decode, resize to 299x299 and scaling
    features.py    the features by torch-fidelity's names (64, 192, 768, 2048, logits_unbiased, logits)
    stats.py       streaming, mergeable float64 statistics; pytorch-fid's .npz
    fid.py         the Fréchet distance by a symmetric eigenproblem (never imaginary)
    kid.py, isc.py torch-fidelity's KID and IS: same seeds, subsets and splits
    api.py         folders and statistics files -> scores
"""

from .api import InputFeatures, calculate_metrics, compute_statistics, input_features
from .fid import frechet_distance
from .isc import inception_score
from .kid import kernel_inception_distance
from .protocols import PROTOCOLS, Protocol, get_protocol
from .stats import FeatureStats

__all__ = [
    "FeatureStats",
    "InputFeatures",
    "PROTOCOLS",
    "Protocol",
    "calculate_metrics",
    "compute_statistics",
    "frechet_distance",
    "get_protocol",
    "inception_score",
    "input_features",
    "kernel_inception_distance",
]
