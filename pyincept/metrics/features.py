"""The features the FID tools take from the FID Inception, by torch-fidelity's names:

    name              where                                   shape
    64                maxpool1 (TF: pool), averaged over H, W  (N, 64)
    192               maxpool2 (TF: pool_1), averaged          (N, 192)
    768               Mixed_6e (TF: mixed_7/join), averaged    (N, 768)
    2048              avgpool (TF: pool_3)                     (N, 2048)    FID and KID
    logits_unbiased   the fc without its bias                  (N, 1008)    IS
    logits            fc                                       (N, 1008)

pytorch-fid's `--dims 64 | 192 | 768 | 2048` are the first four (its blocks 0 to 3).
Input: the (N, 299, 299, 3) float32 batch a protocol makes. Output: float32.
"""

import warnings

import numpy as np

from ..errors import PyinceptError

FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")
DIMS = (64, 192, 768, 2048)
_MAPS = {"64": "maxpool1", "192": "maxpool2", "768": "Mixed_6e"}        # averaged over H and W
_INCEPTION_V3 = ("inception_v3_fid", "inception_v3")


def check_model(model):
    """The metrics need Inception v3's layers: the FID Inception, or torchvision's v3 (whose
    scores are not comparable with published ones)."""
    return check_model_name(model.spec.name if model.spec else None, model.title)


def check_model_name(name, title=None):
    if name not in _INCEPTION_V3:
        raise PyinceptError(f"{title or name} cannot give FID, KID or IS features: the metrics need the FID "
                            "Inception (pyincept weights fetch --model inception_v3_fid, or convert its .pth)")
    if name == "inception_v3":
        warnings.warn("these are torchvision's Inception v3 weights, not the FID Inception's: the scores are "
                      "not comparable with published ones", stacklevel=3)
    return name


def extract(model, x, names):
    """{name: (N, D) float32} for the feature names asked, from one forward pass as far as needed."""
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise PyinceptError(f"unknown feature {unknown[0]!r}: use one of {', '.join(FEATURES)}")
    layers = sorted({_MAPS.get(n, "fc" if n == "logits" else "avgpool") for n in names})
    out = model.run(x, layers)
    features = {}
    for name in names:
        if name in _MAPS:
            # the global average, summed in float64: (N, H, W, C) -> (N, C)
            features[name] = out[_MAPS[name]].mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
        elif name == "logits":
            features[name] = np.asarray(out["fc"], np.float32)
        else:
            pooled = np.asarray(out["avgpool"], np.float32).reshape(len(x), -1)          # (N, 2048)
            features[name] = pooled if name == "2048" else _unbiased_logits(model, pooled)
    return features


def _unbiased_logits(model, pooled):
    """The fc without its bias (pytorch-fid's "logits_unbiased"), on the device the model runs
    on, from the weights in the form its kernel holds them."""
    ops = model.ops
    return np.asarray(ops.to_host(ops.linear(ops.to_device(pooled), model.fc.weight)), np.float32)
