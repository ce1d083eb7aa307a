"""Classify images: find them, load and preprocess them, run them in batches, rank the classes.

This is what `pyincept classify` and `pyincept.classify()` do. It never stops at a bad
input: an unreadable file becomes a result with an `error` and every other image
still gets its answer, in input order.

What it is not: a data pipeline. Images are decoded one after another in this
process; the batching is only for the network.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import kernels
from .errors import PyinceptError, stop_if_interrupted
from .labels import imagenet_labels
from .preprocess import ImageError, load_image, preprocess

# Extensions taken when searching a folder (files named explicitly are always tried).
IMAGE_SUFFIXES = frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class Prediction:
    """One input's answer: its top classes, or the reason it has none."""

    path: str
    top: list = field(default_factory=list)   # [{"index": int, "label": str, "probability": float}]
    error: str | None = None

    def to_json(self):
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": self.top}


def find_images(paths):
    """Expand PATHs: files as given, folders searched recursively in sorted order.

    Returns a list of str paths. A path that does not exist is kept, so that it is
    reported as a failed input rather than silently dropped. Hidden files and files
    without an image extension are skipped inside folders.
    """
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path).parts
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative):
                    found.append(str(child))
        else:
            found.append(str(raw))
    return found


def top_k(probabilities, k, labels):
    """[{"index", "label", "probability"}] for the k most probable classes, best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i], "probability": float(probabilities[i])} for i in order]


def classify(inputs, model, top=5, batch_size=8, labels=None, head=None, preprocessing=None, progress=False):
    """Yield a `Prediction` per input, in order.

    inputs: paths (str / Path) or PIL images; a PIL image is reported as "<image i>".
    model: any registered network. head: optional (weights (D, K), bias (K,)) replacing fc,
    with `labels` naming its K classes. preprocessing: settings for `preprocess`
    (default: the model's metadata, else the published recipe).
    """
    if top < 1:
        raise PyinceptError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise PyinceptError(f"--batch-size must be at least 1, got {batch_size}")
    settings = preprocessing or preprocessing_for(model)
    labels = labels or labels_for(model)
    from tqdm import tqdm

    inputs = list(inputs)
    with tqdm(total=len(inputs), unit="img", disable=not progress, leave=False) as bar:
        for start, chunk, pixels, slots, errors in prepared_batches(inputs, settings, batch_size):
            results = [Prediction(str(item) if not isinstance(item, Image.Image) else f"<image {start + i}>",
                                  error=errors.get(i)) for i, item in enumerate(chunk)]
            if pixels is not None:
                probabilities = _probabilities(model, pixels, head)                 # (n, classes)
                for i, p in zip(slots, probabilities):
                    results[i].top = top_k(p, min(top, len(labels)), labels)
            bar.update(len(chunk))
            yield from results


def prepared_batches(inputs, settings, batch_size):
    """Yield (start, chunk, pixels, slots, errors) per batch of `inputs`: the chunk's readable
    images prepared by `preprocess(**settings)` as one (n, H, W, 3) array (None if none was
    readable), the chunk positions they came from, and {position: reason} for the others."""
    for start in range(0, len(inputs), batch_size):
        stop_if_interrupted()
        chunk = inputs[start : start + batch_size]
        pixels, slots, errors = [], [], {}
        for i, item in enumerate(chunk):
            try:
                pixels.append(preprocess(load_image(item), **settings))
                slots.append(i)
            except ImageError as e:
                errors[i] = str(e)
        yield start, chunk, np.stack(pixels) if pixels else None, slots, errors


def labels_for(model):
    """The class names of the model's logits (its weights' label set); a one-line error for a
    model whose classes have no names (the FID Inception's 1008)."""
    kind = model.spec.default_weights.labels if model.spec else "imagenet"
    names = getattr(model, "labels", None) or (imagenet_labels() if kind == "imagenet" else None)
    if names is None or len(names) != model.num_classes:
        raise PyinceptError(f"{model.title} has {model.num_classes} unnamed classes: classify needs a --head, "
                            "or use its features")
    return names


def preprocessing_for(model):
    """The preprocessing the model's weights were trained with (from their metadata), else
    the recipe of the model's published weights."""
    return model.meta.get("preprocessing") or model.spec.default_weights.preprocessing


def _probabilities(model, x, head):
    if head is None:
        return kernels.softmax(model(x))
    features = model.run(x, [model.feature_layer])[model.feature_layer].reshape(len(x), -1)   # (n, D)
    weight, bias = head
    return kernels.softmax(kernels.linear(features, weight, bias))
