"""The family: model name -> its network and the weight sets that travel with it.

    pyincept.models()                                  # ['googlenet', 'inception_v3', 'inception_v3_fid']
    model = pyincept.create_model("googlenet")         # seeded random init
    model = pyincept.load_model("googlenet.npz")       # whichever model the file holds
    pyincept.detect_model(params)                      # which model a state dict's keys and shapes fit

A weight file records its model's name (`meta["model"]`, written by `pyincept convert`);
files written before the registry existed hold Inception v3 and are recognised by their keys.
"""

import os

from ..errors import PyinceptError, WeightsError
from ..io.npz import WeightFile, first_keys, load_weights
from . import googlenet, inception_v3, inception_v3_fid
from .network import DEFAULT_SEED

MODELS = {spec.name: spec for spec in (googlenet.SPEC, inception_v3.SPEC, inception_v3_fid.SPEC)}


def models():
    """The registered model names, sorted."""
    return sorted(MODELS)


def get_spec(name):
    """The ModelSpec of `name`; a one-line error naming the choices otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise PyinceptError(f"unknown model {name!r}; choose one of {', '.join(models())}") from None


def create_model(name, weights=None, device="cpu", seed=DEFAULT_SEED, fuse=True, algorithm="winograd"):
    """Build model `name`.

    weights: None for a deterministic random init (`seed`), or the path of a pyincept weight
    file (`.npz`, from `pyincept convert` or `pyincept weights fetch`), which must hold this model.
    device: "cpu", "reference" (the plain-NumPy twins, for study) or "cuda" (the `cuda` extra).
    fuse: lay the 1x1 fusion plan over every module that has one (exact up to float rounding).
    algorithm: "winograd" or "im2col" for the stride-1 3x3, 5x5, 1x3, 3x1, 1x7 and 7x1 convs.
    """
    spec = get_spec(name)
    if weights is None:
        model = spec.network(num_classes=spec.num_classes, fuse=fuse, algorithm=algorithm).to(device)
        model.load_parameters(model.random_parameters(seed), source=f"random init (seed {seed})",
                              meta={"random_seed": seed, "model": name},
                              reload=lambda keys=None: model.random_parameters(seed), consume=True)
        return model
    with WeightFile(weights) as params:
        held = held_model(params, params.meta, weights)
        if held != name:
            raise WeightsError(f"{weights} holds {held} weights, not {name}; load it with pyincept.load_model")
        return _build(spec, params, params.meta, str(weights), device, fuse, algorithm)


def load_model(path, device="cpu", fuse=True, algorithm="winograd"):
    """Build whichever registered model the weight file at `path` holds."""
    with WeightFile(path) as params:
        spec = get_spec(held_model(params, params.meta, path))
        return _build(spec, params, params.meta, str(path), device, fuse, algorithm)


def held_model(params, meta, source="weights"):
    """The registered name of the model a weight file holds: its metadata's, else (a file
    written before the registry) the one its keys and shapes fit."""
    return meta.get("model") or detect_model(params, source)


def _build(spec, params, meta, source, device, fuse, algorithm):
    """The network with `params` (an open WeightFile, or a dict) loaded stage by stage and
    taken out of `params`, so the file's arrays die as the kernels build their own forms,
    and their memory goes back to the OS."""
    from ..kernels.runtime import release_freed_memory

    num_classes = int(meta.get("num_classes", spec.num_classes))          # a fine-tuned file's own classes
    model = spec.network(num_classes=num_classes, fuse=fuse, algorithm=algorithm).to(device)
    model.load_parameters(params, source=source, meta=meta, reload=_reader(source), consume=True)
    if meta.get("labels"):
        model.labels = tuple(str(label) for label in meta["labels"])
    params.clear()
    release_freed_memory()
    return model


def _reader(path):
    """A function that reads the weight file at `path` again, refusing it once it changed
    (its size or modification time) since now."""
    def stamp():
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns

    loaded = stamp()

    def read(keys=None):
        if stamp() != loaded:
            raise WeightsError(f"{path} changed since the model was loaded from it; load the model again")
        return load_weights(path, keys)[0]

    return read


def detect_model(params, source="weights"):
    """The registered model whose parameter table `params` (pyincept layout) fits exactly.

    An aux head's keys may be absent all together (a state dict saved with aux_logits=False).
    Otherwise a one-line WeightsError names the nearest model and the keys that differ.
    """
    scored = []
    for name in models():
        network = MODELS[name].network()
        missing, unexpected, reshaped = network.compare_parameters(params)
        if not (missing or unexpected or reshaped):
            return name
        expected = len(params) - len(unexpected) + len(missing)                 # the table's size
        matching = expected - len(missing) - len(reshaped)
        scored.append((matching / max(expected, len(params), 1), name, missing, unexpected, reshaped))
    _, name, missing, unexpected, reshaped = max(scored)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({first_keys(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({first_keys(unexpected)})")
    if reshaped:
        shown = first_keys([f"{k!r} has shape {got}, expected {want}" for k, got, want in reshaped], quote=False)
        parts.append(f"{len(reshaped)} key(s) of another shape ({shown})")
    raise WeightsError(f"{source}: not a checkpoint of any model pyincept knows; nearest is {name}: " + "; ".join(parts))


# --- shortcuts, as torchvision spells them ------------------------------------------------


def inception_v3(weights=None, seed=DEFAULT_SEED, device="cpu", fuse=True, algorithm="winograd"):
    """Inception v3 (Szegedy et al. 2015); `create_model("inception_v3", ...)`."""
    return create_model("inception_v3", weights, device, seed, fuse, algorithm)


def googlenet(weights=None, seed=DEFAULT_SEED, device="cpu", fuse=True, algorithm="winograd"):
    """GoogLeNet, Inception v1 (Szegedy et al. 2014); `create_model("googlenet", ...)`."""
    return create_model("googlenet", weights, device, seed, fuse, algorithm)


def compile_kernels(names=None, log=None):
    """Run every registered model (or `names`) once on a blank input, alone and in a batch,
    with each algorithm, so that every Numba kernel they use is compiled and written to
    Numba's on-disk cache (`cache=True`): a later process loads them instead of compiling.
    For container images and deployments: `pyincept compile` at build time."""
    import numpy as np

    from .network import ALGORITHMS, SOFTMAX

    for name in names or models():
        spec = get_spec(name)
        model = create_model(name)
        H, W = spec.input_size
        for algorithm in ALGORITHMS:
            model.set_algorithm(algorithm)
            for batch in (1, 2):                  # a lone image splits its layers; a batch runs side by side
                model.run(np.zeros((batch, H, W, 3), np.float32), [SOFTMAX])        # logits, then classify's softmax
        model.grad(np.zeros((1, *spec.min_size, 3), np.float32), 0)               # the backward's kernels (col2im)
        if log:
            log(name)
