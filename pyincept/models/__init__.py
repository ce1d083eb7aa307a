"""The family: one file per network with its blocks beside it, the registry that names them.

    inception_v3.py   Inception v3 (Szegedy et al. 2015), torchvision's
    inception_v3_fid.py  the FID Inception: TensorFlow's 2015 graph, as pytorch-fid patches v3
    googlenet.py      GoogLeNet, Inception v1 (Szegedy et al. 2014), torchvision's
    network.py        what they share: stages, aux heads, taps, loading, devices
    spec.py           what travels with the weights (URL, hash, recipe, sizes)
    registry.py       name -> spec; create_model, load_model, detect_model, and the
                      shortcuts pyincept.inception_v3 / pyincept.googlenet (not re-exported
                      here, where those names are the model files)
"""

from .registry import MODELS, create_model, detect_model, get_spec, load_model, models

__all__ = ["MODELS", "create_model", "detect_model", "get_spec", "load_model", "models"]
